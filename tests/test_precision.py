"""Per-tower precision: weights stored in float16/bfloat16 and widened where they are used compute exactly what
float32 compute does on the stored values (every family); float16 compute on the CPU gives the reference tokens
wherever the reference's top1-top2 margin exceeds the logit error it measures (VisualGLM fixture). (A compute
dtype the CPU cannot run: test_cli.py.)"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import fixture_path, load_json, npz_prefix
from test_visualglm_parity import full_logits, greedy, prepare

HALF = ["float16", "bfloat16"]
# the two builds differ only in where the cast happens; fp32 sums of the same values agree to rounding
SAME_TOL = 1e-5


def family_names():
    from visual_mllm.families import FAMILIES

    return [f.name for f in FAMILIES]


def matrices(model):
    """{name: Parameter} of the Linear and Embedding weights (what param_dtype governs)."""
    return {p.name: p for p in model.get_parameters() if len(p.shape) == 2}


def prompt_logits(model, processor):
    """Logits of a text-only and an image prompt of the family's own template (random demo weights)."""
    from visual_mllm.generation.generator import NO_IMAGE

    out = []
    pixels = processor.image_processor(str(fixture_path("visualglm", "images", "chelsea_56.png")))
    for with_image in (False, True):
        ids = processor.prompt_builder.build_ids("What is in this picture?", [], has_image=with_image)
        length = len(ids.input_ids)
        positions, prefix = model.llm.positions.prompt([ids.input_ids], length)
        hidden = model.config.llm_config.hidden_size
        embeds = model.encode_images(pixels) if with_image else np.zeros((1, model.num_image_tokens, hidden),
                                                                          np.float32)
        start = ids.image_start if with_image else NO_IMAGE
        logits = model(Tensor(np.array([ids.input_ids], np.int32)), Tensor(embeds), Tensor(np.array([start], np.int32)),
                       Tensor(positions), Tensor(np.array([length], np.int32)), Tensor(prefix))
        out.append(logits.asnumpy()[0])
    return out


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", family_names())
def test_half_storage_computes_what_fp32_computes_on_the_stored_values(family, dtype):
    import visual_mllm
    from visual_mllm.families import get
    from visual_mllm.registry import precision_overrides

    ms.set_context(mode=ms.GRAPH_MODE)
    record = get(family)
    full, processor = visual_mllm.load_from_yaml(record.demo_config)
    half, _ = visual_mllm.load_from_yaml(record.demo_config, **precision_overrides(dtype))
    wide, narrow = matrices(full), matrices(half)
    assert set(wide) == set(narrow)
    half_params = dict(half.parameters_and_names())
    for name, param in full.parameters_and_names():
        stored = Tensor(param.asnumpy()).astype(narrow[name].dtype) if name in narrow else param
        half_params[name].set_data(stored.astype(half_params[name].dtype))
        param.set_data(stored.astype(ms.float32))  # float32 holding the stored values
    for expected, got in zip(prompt_logits(full, processor), prompt_logits(half, processor)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=SAME_TOL * max(1.0, np.abs(expected).max()))

    kept = [n for n, p in narrow.items() if p.dtype == ms.float32]
    # bfloat16 tables stay float32 on the CPU (no bfloat16 Gather there); every other matrix is half
    assert all("embed" in n or "word_embeddings" in n for n in kept), kept
    if dtype == "float16":
        assert not kept
    wide_bytes = sum(p.size * 4 for p in wide.values())
    narrow_bytes = sum(p.size * (4 if p.dtype == ms.float32 else 2) for p in narrow.values())
    assert narrow_bytes == wide_bytes // 2 + sum(narrow[n].size * 2 for n in kept)


@pytest.fixture(scope="module")
def fp16_compute_model(converted_visualglm):
    """The SAT fp32 fixture's conversion held in float16 and computed in float16 (fp16 rounding of the fp32
    weights = the fixture's fp16 checkpoint, reference_fp16_weights.npz's weights)."""
    from visual_mllm import load_from_yaml
    from visual_mllm.registry import precision_overrides

    ms.set_context(mode=ms.GRAPH_MODE)
    return load_from_yaml(converted_visualglm / "run_visualglm.yaml", **precision_overrides("float16", "float16"))[0]


def step_margins(step_logits):
    """Top-1 minus top-2 of each recorded greedy step."""
    top = np.sort(step_logits, axis=-1)
    return top[:, -1] - top[:, -2]


def test_fp16_compute_gives_the_reference_tokens_where_margins_allow(fp16_compute_model):
    from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder
    from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

    model = fp16_compute_model
    reference = load_json("visualglm", "reference.json")
    arrays = np.load(fixture_path("visualglm", "reference_fp16_weights.npz"))
    tokenizer = ChatGLMTokenizer.from_folder(str(fixture_path("visualglm", "hf", "visualglm-tiny")))
    builder = VisualGLMPromptBuilder(tokenizer, model.num_image_tokens, placeholder="pad")
    checked = 0
    for sample in reference["samples"]:
        prefix = npz_prefix(sample, arrays)
        row, pixels = prepare(sample, builder, model)
        error = float(np.abs(full_logits(model, row, pixels) - arrays[f"{prefix}_logits"]).max())
        expected = sample["fp16_weights"]["generated_ids"]
        got = model.generate_ids([row], greedy(reference, model), pixels)[0]
        margins = step_margins(arrays[f"{prefix}_step_logits"])
        steps = []
        for step, (want, margin) in enumerate(zip(expected, margins)):
            if margin <= 2 * error:  # an fp16 rounding may flip this step: nothing after it is comparable
                break
            assert got[step] == want, (f"{sample['name']} step {step}: {got[step]} != {want} although the "
                                       f"margin {margin:.3g} > 2 x the measured logit error {error:.3g}")
            steps.append(step)
        checked += len(steps)
        print(f"{sample['name']}: fp16 compute logit error {error:.2e}; checked steps {steps}")
    assert checked, "no greedy step had a margin above twice the fp16 logit error"

