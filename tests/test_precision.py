"""Per-tower precision: weights stored in float16/bfloat16 and widened where they are used compute exactly what
float32 compute does on the stored values (every family); float16 compute on the CPU gives the reference tokens
wherever the reference's top1-top2 margin exceeds the logit error it measures (VisualGLM fixture). (A compute
dtype the CPU cannot run: test_cli.py.)"""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import fixture_path, load_json, npz_prefix, steps_where_margins_allow
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


def tokens_where_margins_allow(model, arrays, expected_ids, label, bound=None):
    """Greedy tokens of every fixture sample against `expected_ids(sample)`, step by step while the reference
    margin (from arrays' step logits) exceeds twice the prompt-logit error measured here; prints what was
    checked and returns how many steps were. bound(logits): the largest error allowed, if any."""
    from visual_mllm.processing.visualglm_prompt import VisualGLMPromptBuilder
    from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

    reference = load_json("visualglm", "reference.json")
    tokenizer = ChatGLMTokenizer.from_folder(str(fixture_path("visualglm", "hf", "visualglm-tiny")))
    builder = VisualGLMPromptBuilder(tokenizer, model.num_image_tokens, placeholder="pad")
    checked = 0
    for sample in reference["samples"]:
        prefix = npz_prefix(sample, arrays)
        row, pixels = prepare(sample, builder, model)
        expected_logits = arrays[f"{prefix}_logits"]
        error = float(np.abs(full_logits(model, row, pixels) - expected_logits).max())
        if bound is not None:
            assert error < bound(expected_logits), (sample["name"], error)
        got = model.generate_ids([row], greedy(reference, model), pixels)[0]
        checked += len(steps_where_margins_allow(sample["name"], got, expected_ids(sample),
                                                 step_margins(arrays[f"{prefix}_step_logits"]), error, label))
    return checked


def test_fp16_compute_gives_the_reference_tokens_where_margins_allow(fp16_compute_model):
    arrays = np.load(fixture_path("visualglm", "reference_fp16_weights.npz"))
    checked = tokens_where_margins_allow(fp16_compute_model, arrays, lambda s: s["fp16_weights"]["generated_ids"],
                                         "fp16 compute")
    assert checked, "no greedy step had a margin above twice the fp16 logit error"

# ----------------------------------------------------------------------------------------- int8 weights

def copy_into_int8(full, quantized):
    """Give `quantized` (LLM quantize: int8) the weights of `full` (float): its int8 layers get
    quantize_int8 of full's weights, and full's weights become the dequantised values. Returns the names."""
    from visual_mllm.layers import SCALE_SUFFIX, quantize_int8

    params = dict(quantized.parameters_and_names())
    names = []
    for name, param in full.parameters_and_names():
        target = params[name]
        if target.dtype == ms.int8:
            q, scale = quantize_int8(param.asnumpy())
            target.set_data(Tensor(q))
            params[name + SCALE_SUFFIX].set_data(Tensor(scale))
            param.set_data(Tensor(q.astype(np.float32) * scale[:, None]))
            names.append(name)
        else:
            target.set_data(Tensor(param.asnumpy()).astype(target.dtype))
    return names


@pytest.mark.parametrize("family", family_names())
def test_int8_llm_computes_what_fp32_computes_on_the_dequantised_weights(family):
    import visual_mllm
    from visual_mllm.families import get
    from visual_mllm.registry import precision_overrides

    ms.set_context(mode=ms.GRAPH_MODE)
    record = get(family)
    full, processor = visual_mllm.load_from_yaml(record.demo_config)
    quantized, _ = visual_mllm.load_from_yaml(record.demo_config, **precision_overrides(quantize="int8"))
    names = copy_into_int8(full, quantized)
    # every Linear of the LLM but lm_head; nothing of the image side, the embedding or the norms
    linears = {n for n, p in full.parameters_and_names() if n.startswith("llm.") and len(p.shape) == 2
               and "lm_head" not in n and "embed" not in n}
    assert set(names) == linears
    for expected, got in zip(prompt_logits(full, processor), prompt_logits(quantized, processor)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=SAME_TOL * max(1.0, np.abs(expected).max()))
    held = dict(quantized.parameters_and_names())
    assert {held[n].dtype for n in linears} == {ms.int8}  # a quarter of float32's bytes
    assert all(held[n + "_scale"].shape == (held[n].shape[0],) for n in linears)  # one scale per output row


def test_int8_linear_takes_the_fused_matmul_on_ascend_only(monkeypatch):
    """Ascend runs int8 Linears through WeightQuantBatchMatmul (float16/bfloat16 compute); every other case,
    this CPU included, widens the weight in the graph. (The fused kernel itself needs an Ascend device.)"""
    from visual_mllm import layers

    int8_half = layers.Precision(ms.float16, ms.float16, "int8")
    assert not layers.Linear(8, 4, precision=int8_half).fused_int8
    real = ms.get_context
    monkeypatch.setattr(ms, "get_context", lambda key: "Ascend" if key == "device_target" else real(key))
    fused = layers.Linear(8, 4, precision=int8_half)
    assert fused.fused_int8 and not fused.widen and isinstance(fused.weight_quant_matmul,
                                                               layers.WeightQuantBatchMatmul)
    assert not layers.Linear(8, 4, precision=layers.Precision(ms.float16, ms.float32, "int8")).fused_int8
    assert not layers.Linear(8, 4, precision=layers.Precision(ms.float16, ms.float16)).fused_int8


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_int8_is_the_per_row_symmetric_formula(dtype):
    """The blocked one-pass quantiser equals round(w / (max|w_row| / 127)) on every row, a zero row and a row
    count that is not a multiple of the block included."""
    from visual_mllm.layers import INT8_MAX, QUANTIZE_ROWS, quantize_int8

    w = (np.random.default_rng(0).standard_normal((2 * QUANTIZE_ROWS + 5, 48)) * 0.02).astype(dtype)
    w[3] = 0
    w[7, 5] = -np.abs(w[7]).max() * 2  # a row whose extreme is negative
    q, scale = quantize_int8(w)
    wide = w.astype(np.float32)
    want_scale = np.abs(wide).max(axis=1) / INT8_MAX
    want_scale[want_scale == 0] = 1.0
    np.testing.assert_array_equal(scale, want_scale.astype(np.float32))
    np.testing.assert_array_equal(q, np.rint(wide / want_scale[:, None]).astype(np.int8))
    assert q.dtype == np.int8 and q[7, 5] == -INT8_MAX and not q[3].any()


@pytest.fixture(scope="module")
def int8_model(converted_visualglm):
    """The SAT fp32 fixture's conversion with the LLM quantised to int8 as it loads."""
    from visual_mllm import load_from_yaml
    from visual_mllm.registry import precision_overrides

    ms.set_context(mode=ms.GRAPH_MODE)
    return load_from_yaml(converted_visualglm / "run_visualglm.yaml", **precision_overrides(quantize="int8"))[0]


def test_int8_weights_give_the_reference_tokens_where_margins_allow(int8_model):
    # per-channel int8 of weights ~N(0, 0.02^2): a fraction of the logit range, never most of it
    checked = tokens_where_margins_allow(int8_model, np.load(fixture_path("visualglm", "reference.npz")),
                                         lambda s: s["generated_ids"], "int8",
                                         bound=lambda logits: 0.1 * (logits.max() - logits.min()))
    assert checked, "no greedy step had a margin above twice the int8 logit error"

def test_int8_checkpoints_round_trip_and_are_refused_by_a_float_model(int8_model, converted_visualglm, tmp_path):
    from visual_mllm import load_from_yaml
    from visual_mllm.models.weights import CheckpointMismatchError, save_split_checkpoints
    from visual_mllm.registry import precision_overrides

    files = {part: f"{part}.ckpt" for part in ("vit", "qformer", "llm")}
    paths = save_split_checkpoints(int8_model, str(tmp_path), files)
    keys = {f"{part}_checkpoint": path for part, path in paths.items()}
    again = load_from_yaml(converted_visualglm / "run_visualglm.yaml", **keys,
                           **precision_overrides(quantize="int8"))[0]
    for (name, a), (_, b) in zip(int8_model.parameters_and_names(), again.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)
    with pytest.raises(CheckpointMismatchError, match="set quantize: int8") as err:
        load_from_yaml(converted_visualglm / "run_visualglm.yaml", **keys)
    assert "llm.layers.0" in str(err.value) and paths["llm"] in str(err.value)


MEMORY_SCRIPT = '''
import sys
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from visual_mllm.layers import Linear, Precision

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

class Stack(nn.Cell):
    def __init__(self, layers, width):
        super().__init__()
        self.layers = nn.CellList([Linear(width, width, has_bias=False, precision=Precision(ms.float16, ms.float32))
                                   for _ in range(layers)])
    def construct(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

ms.set_context(mode=ms.GRAPH_MODE)
layers, width = int(sys.argv[1]), int(sys.argv[2])
net = Stack(layers, width)
x = Tensor(np.ones((1, width), np.float32))
before = rss_mib()
net(x).asnumpy()  # the first call: compile and run
print(rss_mib() - before)
'''


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_graph_mode_widens_one_weight_at_a_time(tmp_path, kernels):
    """float16 storage + float32 compute: in the portable path (VISUAL_MLLM_CPU_KERNELS=0) each Linear's float32
    copy of its weight exists only while that layer runs (without `depend`, graph mode launched every cast at
    once: a float32 copy of all weights); cpu_kernels' matmul makes no copy at all."""
    import os
    import subprocess
    import sys

    script = tmp_path / "widen.py"
    script.write_text(MEMORY_SCRIPT)
    layers, width = 8, 2048  # 64 MiB of float16 weights
    result = subprocess.run([sys.executable, str(script), str(layers), str(width)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=dict(os.environ, VISUAL_MLLM_CPU_KERNELS=kernels))
    assert result.returncode == 0, result.stderr[-2000:]
    growth = float(result.stdout.split()[-1])
    all_at_once = layers * width * width * 4 / 2 ** 20  # MiB of float32 copies of every weight: 128
    one_layer = all_at_once / layers
    # measured: portable +33 MiB with the depend, +145 MiB without; kernel +9 MiB
    limit = all_at_once / 2 if kernels == "0" else one_layer
    assert growth < limit, f"the first call grew VmHWM by {growth:.0f} MiB (all copies: {all_at_once:.0f})"
