"""cpu_kernels' weight-only matmul (float16 / bfloat16 / int8 weights read as stored): the same numbers as the
portable path that widens the weight in the graph, a clear fallback where it cannot be built, never in
training (no gradient) and never in exported graphs (they must load on other machines)."""
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from conftest import REPO_ROOT

PRECISIONS = {"float16": (ms.float16, None), "bfloat16": (ms.bfloat16, None), "int8": (ms.float16, "int8")}


def kernel_or_skip():
    from visual_mllm import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("the CPU kernel cannot be built here (see the line on stderr)")


def pair(in_features, out_features, name):
    """(Linear on the kernel, Linear on the portable path) with the same weights, inference mode."""
    from visual_mllm.layers import Linear, Precision

    param, quantize = PRECISIONS[name]
    precision = Precision(param, ms.float32, quantize)
    fast, portable = Linear(in_features, out_features, precision=precision), Linear(in_features, out_features,
                                                                                    precision=precision)
    for (_, a), (_, b) in zip(fast.parameters_and_names(), portable.parameters_and_names()):
        b.set_data(a.data.copy())
    portable.cpu_kernel = False
    fast.set_train(False)
    portable.set_train(False)
    return fast, portable


@pytest.mark.parametrize("name", sorted(PRECISIONS))
@pytest.mark.parametrize("rows,in_features,out_features", [(1, 4096, 300), (5, 300, 77), (9, 64, 33)])
def test_kernel_computes_what_the_portable_path_computes(name, rows, in_features, out_features):
    kernel_or_skip()
    ms.set_context(mode=ms.GRAPH_MODE)
    fast, portable = pair(in_features, out_features, name)
    assert fast.cpu_kernel
    x = Tensor(np.random.default_rng(rows).standard_normal((rows, 1, in_features)).astype(np.float32))
    expected = portable(x).asnumpy()
    got = fast(x).asnumpy()
    assert got.shape == expected.shape == (rows, 1, out_features)
    # float32 sums of the same products in another order
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.sqrt(in_features) * np.abs(expected).max())


def test_training_takes_the_portable_path():
    """The kernel has no gradient: a Linear in training mode widens its weight, and gradients flow."""
    kernel_or_skip()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    fast, portable = pair(64, 16, "float16")
    fast.set_train(True)
    portable.set_train(True)
    x = Tensor(np.ones((2, 64), np.float32))
    grads = [ms.grad(lambda t, layer=layer: layer(t).sum())(x).asnumpy() for layer in (fast, portable)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)
    ms.set_context(mode=ms.GRAPH_MODE)


def run_python(code, tmp_path, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, VISUAL_MLLM_CACHE=str(tmp_path / "cache"), **env))


def test_without_a_compiler_the_layers_fall_back_with_one_line(tmp_path):
    code = ("from visual_mllm import cpu_kernels; import mindspore as ms; from visual_mllm.layers import Linear, "
            "Precision; print(cpu_kernels.available(), Linear(8, 4, precision=Precision(ms.float16)).cpu_kernel)")
    result = run_python(code, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["False", "False"]  # (mindformers logs to stdout on import)
    lines = [line for line in result.stderr.splitlines() if "visual_mllm: CPU kernels unavailable" in line]
    assert len(lines) == 1 and "no-such-compiler" in lines[0]
    switched_off = run_python(code, tmp_path, VISUAL_MLLM_CPU_KERNELS="0")
    assert switched_off.stdout.split()[-2:] == ["False", "False"] and "unavailable" not in switched_off.stderr


def test_a_built_library_is_reused_and_named_by_its_sources(tmp_path):
    from visual_mllm import cpu_kernels

    kernel_or_skip()
    first = cpu_kernels.build(os.environ.get("CXX", "g++"), str(tmp_path))
    mtime = os.path.getmtime(first)
    assert cpu_kernels.build(os.environ.get("CXX", "g++"), str(tmp_path)) == first
    assert os.path.getmtime(first) == mtime and os.listdir(tmp_path) == [os.path.basename(first)]


def test_exported_graphs_do_not_use_the_kernel_and_give_the_eager_tokens(tmp_path):
    """A float16 model answers on the kernel eagerly; its exported graphs (portable) give the same tokens and
    name no library of this machine."""
    import visual_mllm
    from visual_mllm.export.exporter import export_model
    from visual_mllm.export.runtime import ExportedModel
    from visual_mllm.generation.generator import PromptRow
    from visual_mllm.generation.sampling import GenerationConfig
    from visual_mllm.registry import plain, precision_overrides, read_run_config

    kernel_or_skip()
    ms.set_context(mode=ms.GRAPH_MODE)
    yaml_path = REPO_ROOT / "configs" / "visualglm_tiny" / "run_visualglm_tiny.yaml"
    model, processor = visual_mllm.load_from_yaml(yaml_path, **precision_overrides("float16"))
    assert any(getattr(cell, "cpu_kernel", False) for _, cell in model.cells_and_names())
    item = processor("描述这张图片。", image=str(REPO_ROOT / "examples" / "images" / "chelsea.png"))
    rows, pixels = [PromptRow(item["input_ids"], item["image_start"])], item["pixel_values"]
    greedy = GenerationConfig(max_new_tokens=8, eos_token_id=model.config.llm_config.eos_token_id)
    eager = model.generate_ids(rows, greedy, pixels)
    export_model(model, plain(read_run_config(str(yaml_path)).processor), processor.tokenizer, str(tmp_path / "x"),
                 1, 96, log=lambda _: None)
    for root, _, files in os.walk(tmp_path / "x"):
        for name in files:
            if name.endswith(".mindir"):
                assert b"weight_only-" not in (open(os.path.join(root, name), "rb").read()), name
    assert ExportedModel(str(tmp_path / "x")).generate_ids(rows, greedy, pixels) == eager
    assert any(getattr(cell, "cpu_kernel", False) for _, cell in model.cells_and_names())  # restored
