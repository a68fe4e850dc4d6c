"""VisualGLM end to end against the reference fixture: image file + prompt -> ids -> logits -> greedy tokens.

Everything (prompts, history, images, sizes, expected ids) comes from the fixture's reference.json,
reference.npz and model_config.json, so the same tests pass on any fixture made the same way.
"""
import mindspore as ms
import numpy as np
import pytest

from conftest import fixture_path, load_json, npz_prefix

LOGIT_TOL = 1e-4  # fp32; the reference's own HF-vs-SAT agreement is 1e-5


@pytest.fixture(scope="module")
def reference():
    return load_json("visualglm", "reference.json")


@pytest.fixture(scope="module")
def arrays():
    return np.load(fixture_path("visualglm", "reference.npz"))


@pytest.fixture(scope="module")
def tokenizer():
    from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

    return ChatGLMTokenizer.from_folder(str(fixture_path("visualglm", "hf", "visualglm-tiny")))


@pytest.fixture(scope="module")
def model(converted_visualglm):
    """The SAT fp32 fixture as convert_weight.py writes it, loaded through the YAML it writes."""
    from visual_mllm import load_from_yaml

    ms.set_context(mode=ms.GRAPH_MODE)
    return load_from_yaml(converted_visualglm / "run_visualglm.yaml")[0]


@pytest.fixture(scope="module")
def builder(tokenizer, model):
    from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder

    return VisualGLMPromptBuilder(tokenizer, model.num_image_tokens, placeholder="pad")


def image_size(model):
    return model.config.image_encoder_config.vit_config.image_size


def blank_pixels(model):
    """One image's worth of zeros [C, H, W] at the converted model's input size (for text-only batch rows)."""
    vit = model.config.image_encoder_config.vit_config
    return np.zeros((vit.in_channels, vit.image_size, vit.image_size), np.float32)


def prepare(sample, builder, model):
    """(PromptRow, pixel values [1,3,H,W] or None) built from the sample's own fields."""
    from visual_mllm.generation.generator import PromptRow
    from visual_mllm.processing.image import BlipImageProcessor

    has_image = bool(sample["image"])
    ids = builder.build_ids(sample["query"], sample["history"], has_image=has_image, english=sample["english"])
    pixels = None
    if has_image:
        pixels = BlipImageProcessor(image_size=image_size(model))(str(fixture_path("visualglm", sample["image"])))
    return PromptRow(ids.input_ids, ids.image_start), pixels


def greedy(reference, model):
    from visual_mllm.generation.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=reference["n_new_tokens"], eos_token_id=model.config.llm_config.eos_token_id)


def full_logits(model, row, pixels):
    """Logits of every prompt position through the model's construct."""
    from mindspore import Tensor
    from visual_mllm.generation.generator import NO_IMAGE

    length = len(row.ids)
    positions, prefix = model.llm.positions.prompt([row.ids], length)
    hidden = model.config.llm_config.hidden_size
    embeds = np.zeros((1, model.num_image_tokens, hidden), np.float32) if pixels is None else model.encode_images(pixels)
    start = NO_IMAGE if row.image_start is None else row.image_start
    out = model(Tensor(np.array([row.ids], np.int32)), Tensor(embeds), Tensor(np.array([start], np.int32)),
                Tensor(positions), Tensor(np.array([length], np.int32)), Tensor(prefix))
    return out.asnumpy()[0]


def test_prompt_ids_and_logits(reference, arrays, builder, model):
    for sample in reference["samples"]:
        prefix = npz_prefix(sample, arrays)
        row, pixels = prepare(sample, builder, model)
        assert row.ids == sample["input_ids"], sample["name"]
        if pixels is not None:
            np.testing.assert_allclose(model.encode_images(pixels)[0], arrays[f"{prefix}_image_embeds"],
                                       atol=LOGIT_TOL)
        diff = np.abs(full_logits(model, row, pixels) - arrays[f"{prefix}_logits"]).max()
        assert diff < LOGIT_TOL, f"{sample['name']}: prompt logits differ by {diff}"


@pytest.mark.parametrize("use_past", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_tokens_one_by_one(reference, builder, model, use_past):
    for sample in reference["samples"]:
        row, pixels = prepare(sample, builder, model)
        out = model.generate_ids([row], greedy(reference, model), pixels, use_past=use_past)
        assert out[0] == sample["generated_ids"], sample["name"]


@pytest.mark.parametrize("use_past", [True, False], ids=["kv_cache", "no_cache"])
def test_batch_of_different_lengths_equals_one_by_one(reference, builder, model, use_past):
    prepared = [prepare(s, builder, model) for s in reference["samples"]]
    pixels = np.stack([blank_pixels(model) if p is None else p[0] for _, p in prepared])
    # reversed order too, so that row position in the batch cannot matter
    for order in (list(range(len(prepared))), list(reversed(range(len(prepared))))):
        out = model.generate_ids([prepared[i][0] for i in order], greedy(reference, model), pixels[order],
                                 use_past=use_past)
        for got, i in zip(out, order):
            assert got == reference["samples"][i]["generated_ids"], reference["samples"][i]["name"]
    if len({len(r.ids) for r, _ in prepared}) < 2:
        pytest.skip("every reference prompt has the same length: the batch above needed no padding")


def test_pynative_equals_graph(reference, builder, model):
    # an image sample exercises the whole model (image encoder and splice); any sample if there is none
    sample = next((s for s in reference["samples"] if s["image"]), reference["samples"][0])
    row, pixels = prepare(sample, builder, model)
    config = greedy(reference, model)
    graph = model.generate_ids([row], config, pixels, use_past=True)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model._engines.clear()  # fresh step cells: run them eagerly
        pynative = model.generate_ids([row], config, pixels, use_past=True)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
        model._engines.clear()
    assert pynative[0] == graph[0] == sample["generated_ids"]
