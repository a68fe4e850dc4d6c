"""The generation loop on the tiny random model (no fixtures needed): stopping, streaming, limits."""
import io
import os

import numpy as np
import pytest
import yaml

from conftest import REPO_ROOT

TINY_YAML = os.path.join(REPO_ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")


@pytest.fixture(scope="module")
def model():
    import mindspore as ms
    from visual_mllm.models.visualglm import VisualGLMConfig, VisualGLMForConditionalGeneration

    ms.set_context(mode=ms.GRAPH_MODE)
    with open(TINY_YAML, encoding="utf-8") as f:
        config = yaml.safe_load(f)["model"]["model_config"]
    config.pop("type")
    return VisualGLMForConditionalGeneration(VisualGLMConfig(**config))


def glm_prompt(model, body):
    llm = model.config.llm_config
    return list(body) + [llm.gmask_token_id, llm.bos_token_id]


def rows(model):
    from visual_mllm.generation.generator import PromptRow

    return [PromptRow(glm_prompt(model, [10, 11, 12, 13, 14])), PromptRow(glm_prompt(model, [20, 21]))]


def config(**kw):
    from visual_mllm.generation.sampling import GenerationConfig

    return GenerationConfig(**{"max_new_tokens": 6, **kw})


def test_each_row_stops_at_its_own_end_token(model):
    alone = [model.generate_ids([r], config())[0] for r in rows(model)]
    end = next(t for t in alone[0] if t not in alone[1])  # a token only row 0 produces
    out = model.generate_ids(rows(model), config(eos_token_id=end))
    assert out[0] == alone[0][:alone[0].index(end)]  # stopped there, end token not returned
    assert out[1] == alone[1]  # the other row ran on


def test_streamer_sees_every_token_in_order(model):
    class Recorder:
        def __init__(self):
            self.steps, self.ended = [], False

        def put(self, tokens):
            self.steps.append(list(tokens))

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = model.generate_ids(rows(model), config(), streamer=recorder)
    assert recorder.ended
    assert [list(col) for col in zip(*recorder.steps)] == out


def test_a_cancelled_row_stops_and_the_others_run_on(model):
    """generate(cancelled=...): a row finished from outside (a server's client gone) gets no further token;
    the other rows' tokens are those they get alone; with every row cancelled the loop ends at once."""
    from visual_mllm.generation.generator import generate

    alone = [model.generate_ids([r], config())[0] for r in rows(model)]
    steps = []

    class Counter:
        def put(self, tokens):
            steps.append(list(tokens))

        def end(self):
            pass

    out = generate(model.engine(True), rows(model), config(), None, Counter(),
                   cancelled=lambda: [0] if len(steps) >= 2 else [])
    assert out[0] == alone[0][:2] and out[1] == alone[1]
    steps.clear()
    assert generate(model.engine(True), rows(model), config(), None, Counter(), cancelled=lambda: [0, 1]) == \
        [alone[0][:1], alone[1][:1]]
    assert len(steps) == 1


def test_text_deltas_add_up_to_the_final_text():
    from visual_mllm.generation.streamer import TextDeltas

    pieces = ["a", "b", "#", "#", "c"]
    deltas = TextDeltas(lambda ids: "".join(pieces[i] for i in ids).split("##")[0], holdback=1)
    given = "".join(deltas.add(i) for i in range(len(pieces)))
    assert "#" not in given  # the start of the stop sequence is held back
    assert given + deltas.finish() == "ab" == deltas.text
    changed = TextDeltas(lambda ids: "xyz"[:len(ids)] if len(ids) < 3 else "Z")
    assert changed.add(0) + changed.add(1) + changed.add(2) == "x"
    assert changed.finish() is None and changed.text == "Z"  # rewritten as a whole: the caller is told


def test_text_streamer_prints_the_final_text():
    from visual_mllm.generation.streamer import TextStreamer

    pieces = ["你", "好", ",", "世", "界", "!"]

    def render(ids):  # post-processing that changes punctuation once its neighbour is known
        text = "".join(pieces[i] for i in ids)
        return text.replace(",世", "，世").replace("\ufffd", "")

    stream = io.StringIO()
    streamer = TextStreamer(render, stream=stream)
    for i in range(len(pieces)):
        streamer.put(np.array([i]))
    streamer.end()
    assert stream.getvalue() == render(list(range(len(pieces)))) + "\n"


def test_prompt_that_does_not_fit_says_by_how_much(model):
    from visual_mllm.generation.generator import ContextOverflowError, PromptRow

    seq = model.config.seq_length
    long_row = PromptRow(glm_prompt(model, [10] * (seq - 4)))
    with pytest.raises(ContextOverflowError, match="by 6 tokens"):
        model.generate_ids([long_row], config(max_new_tokens=8))


def test_the_kv_cache_follows_the_need_and_gives_the_tokens_of_a_full_one(model, monkeypatch):
    """A batch size's cache holds the next power of two (>= MIN_CACHE) of what its longest request so far needed,
    up to seq_length; shorter requests reuse it. The tokens are those of a cache of seq_length slots."""
    from visual_mllm.generation import generator
    from visual_mllm.generation.generator import MIN_CACHE, EagerEngine, PromptRow, generate

    seq_length = 4 * MIN_CACHE
    short_row = rows(model)[0]
    long_row = PromptRow(glm_prompt(model, list(range(10, 10 + MIN_CACHE + 10))))  # needs 2 x MIN_CACHE slots
    engine = EagerEngine(model.llm, seq_length, model.config.llm_config.pad_token_id)
    generate(engine, [short_row], config())
    assert engine.cache_slots(1) == MIN_CACHE
    grown = generate(engine, [long_row], config())
    assert engine.cache_slots(1) == 2 * MIN_CACHE
    engine.start(1, len(short_row.ids) + 6)
    assert engine.cache_slots(1) == 2 * MIN_CACHE  # reused, not shrunk
    assert engine.cache_length(seq_length + 1) == seq_length
    monkeypatch.setattr(generator, "MIN_CACHE", seq_length)  # every cache: seq_length slots
    full = EagerEngine(model.llm, seq_length, model.config.llm_config.pad_token_id)
    assert generate(full, [long_row], config()) == grown
    assert full.cache_slots(1) == seq_length


def test_prefill_op_by_op_gives_what_its_graphs_give(model, monkeypatch):
    """prefill_mode pynative (the memory-lean one: image encoding, embedding and prefill op by op, decode compiled)
    gives the graphs' image embeddings and greedy tokens, and restores the context's mode; an unknown mode is
    refused by the config."""
    import mindspore as ms
    from visual_mllm.generation.generator import EagerEngine, PromptRow, generate
    from visual_mllm.models.visualglm import VisualGLMConfig

    size = model.config.image_encoder_config.vit_config.image_size
    pixels = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    image_row = PromptRow(glm_prompt(model, [5, 6] + [model.placeholder_id] * model.num_image_tokens + [7, 8]), 2)
    batch = [image_row, rows(model)[0]]  # an image row and a text-only one
    compiled = model.encode_images(pixels)
    tokens = generate(model.engine(), batch, config(), compiled)
    monkeypatch.setattr(model.config, "prefill_mode", "pynative")
    op_by_op = model.encode_images(pixels)
    np.testing.assert_allclose(op_by_op, compiled, rtol=0, atol=1e-5)
    lean = EagerEngine(model.llm, model.config.seq_length, model.config.llm_config.pad_token_id,
                       prefill_mode="pynative")
    assert generate(lean, batch, config(), op_by_op) == tokens
    assert ms.get_context("mode") == ms.GRAPH_MODE
    with pytest.raises(ValueError, match="prefill_mode must be one of graph, pynative, not 'eager'"):
        VisualGLMConfig(prefill_mode="eager")


def test_sampling_with_a_seed_is_reproducible(model):
    from visual_mllm.families import get
    from visual_mllm.generation.sampling import GenerationConfig

    sample = GenerationConfig(max_new_tokens=5, seed=3, eos_token_id=None, **get("visualglm").sampling)
    assert model.generate_ids(rows(model), sample) == model.generate_ids(rows(model), sample)
