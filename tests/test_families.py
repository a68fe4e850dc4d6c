"""What every family must do, run for every family on its tiny run YAML (random weights, no download):
greedy tokens with and without the KV cache, in a batch of mixed lengths and one by one, through the
mindformers pipeline and through the exported graphs are identical; streaming prints the final answer;
a stop sequence ends its row only; the processor refuses an `english` switch the family lacks.
"""
import io
import os

import numpy as np
import pytest

from conftest import REPO_ROOT

IMAGES = os.path.join(REPO_ROOT, "examples", "images")
# (question, image, history): an image, text only, an image with an earlier turn
REQUESTS = [("What is in this picture?", os.path.join(IMAGES, "chelsea.png"), []),
            ("你好，请介绍一下你自己。", None, []),
            ("What color is it?", os.path.join(IMAGES, "coffee.png"), [("What is this?", "A cup.")])]
NEW_TOKENS = 8


def family_names():
    from visual_mllm.families import FAMILIES

    return [f.name for f in FAMILIES]


@pytest.fixture(scope="module", params=family_names())
def family(request):
    import mindspore as ms
    import visual_mllm
    from visual_mllm.families import get

    ms.set_context(mode=ms.GRAPH_MODE)
    record = get(request.param)
    model, processor = visual_mllm.load_from_yaml(record.demo_config)
    return record, model, processor


def requests():
    from visual_mllm.inference import ChatRequest

    return [ChatRequest(q, image, history) for q, image, history in REQUESTS]


def greedy(model):
    from visual_mllm.generation.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=model.config.llm_config.eos_token_id)


def ids(results):
    return [r.generated_ids for r in results]


@pytest.fixture(scope="module")
def one_by_one(family):
    from visual_mllm.inference import answer

    _, model, processor = family
    return [answer(model, processor, [r], greedy(model))[0] for r in requests()]


def test_the_family_record_builds_its_own_classes(family):
    record, model, processor = family
    assert type(model) is record.model_class and type(model.config) is record.config_class
    assert isinstance(processor.tokenizer, record.tokenizer_class)
    assert isinstance(processor.prompt_builder, record.prompt_builder_class)
    assert model.family == record.name


@pytest.mark.parametrize("name", family_names())
def test_convert_weight_has_a_job_for_the_family(name):
    """--model_type <name> runs the job its record names, whose modules exist."""
    from importlib import import_module

    from visual_mllm.cli.convert import JOBS, build_parser
    from visual_mllm.families import get

    conversion = get(name).conversion
    assert conversion.job in JOBS
    assert build_parser().parse_args(["--model_type", name]).model_type == name
    if conversion.llm_format:
        llm = import_module(f"visual_mllm.convert.{conversion.llm_format}")
        assert llm.TOKENIZER is get(name).tokenizer_class and conversion.projection


def test_batch_and_no_cache_give_the_tokens_of_one_by_one(family, one_by_one):
    from visual_mllm.inference import answer

    _, model, processor = family
    assert all(len(r.generated_ids) for r in one_by_one)
    assert len({len(r.input_ids) for r in one_by_one}) == len(REQUESTS)  # rows of different lengths
    assert ids(answer(model, processor, requests(), greedy(model))) == ids(one_by_one)
    assert ids(answer(model, processor, requests(), greedy(model), use_past=False)) == ids(one_by_one)


def test_pipeline_gives_the_generate_tokens(family, one_by_one):
    from mindformers import pipeline
    from visual_mllm.pipeline import TASK

    _, model, processor = family
    pipe = pipeline(task=TASK, model=model, processor=processor, tokenizer=processor.tokenizer,
                    image_processor=processor.image_processor)
    results = pipe(requests(), batch_size=2, generation_config=greedy(model))
    assert ids(results) == ids(one_by_one)
    assert [r.response for r in results] == [r.response for r in one_by_one]


def test_streaming_prints_the_final_answer(family, one_by_one, monkeypatch):
    from visual_mllm.inference import answer

    _, model, processor = family
    for request, expected in zip(requests(), one_by_one):
        out = io.StringIO(newline="")
        monkeypatch.setattr("sys.stdout", out)
        (result,) = answer(model, processor, [request], greedy(model), stream=True)
        monkeypatch.undo()
        assert result.response == expected.response
        assert out.getvalue() == expected.response + "\n"


def test_a_stop_sequence_ends_its_row_only(family, one_by_one):
    from dataclasses import replace

    from visual_mllm.inference import answer

    _, model, processor = family
    first = one_by_one[0].generated_ids
    stop = first[1:3]  # two tokens row 0 generates: it must stop right after them
    config = replace(greedy(model), stop_sequences=[stop])
    results = answer(model, processor, requests(), config)
    assert results[0].generated_ids == first[:3]
    for result, alone in zip(results[1:], one_by_one[1:]):
        tokens = alone.generated_ids
        ends = [k + len(stop) for k in range(len(tokens)) if tokens[k:k + len(stop)] == stop]
        assert result.generated_ids == tokens[:ends[0]] if ends else tokens


def test_exported_graphs_give_the_eager_tokens(family, one_by_one, tmp_path):
    from visual_mllm.export.exporter import export_model
    from visual_mllm.export.runtime import ExportedModel
    from visual_mllm.inference import answer
    from visual_mllm.registry import plain, read_run_config

    record, model, processor = family
    section = plain(read_run_config(record.demo_config).processor)
    export_model(model, section, processor.tokenizer, str(tmp_path / "lite"), 2, model.config.seq_length,
                 log=lambda _: None)
    exported = ExportedModel(str(tmp_path / "lite"))
    lite = exported.load_processor()
    assert type(lite.prompt_builder) is record.prompt_builder_class
    results = answer(exported, lite, requests()[:2], greedy(model)) + answer(exported, lite, requests()[2:],
                                                                            greedy(model))
    assert ids(results) == ids(one_by_one)
    pixels = processor.preprocess_image(REQUESTS[0][1])
    np.testing.assert_allclose(exported.encode_images(pixels), model.encode_images(pixels), atol=1e-5)


def test_english_is_refused_where_the_family_has_no_such_switch(family):
    from visual_mllm.inference import ChatRequest, answer

    record, model, processor = family
    request = ChatRequest("hello", None, [], english=True)
    if record.name == "visualglm":
        assert answer(model, processor, [request], greedy(model))[0].generated_ids
    else:
        with pytest.raises(ValueError, match="english"):
            answer(model, processor, [request], greedy(model))
