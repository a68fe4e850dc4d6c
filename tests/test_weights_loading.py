"""Checkpoints load tensor by tensor into a model built without random weights (models/weights.py).

Peak memory of build + load (a subprocess, peak RSS) is the weights as the model holds them plus about
one tensor; every file format and dtype the writers produce loads exactly; a mismatch is refused from
the headers, before any tensor is read, and leaves the model as it was.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

import visual_mllm
from visual_mllm.layers import numpy_dtype
from visual_mllm.models.weights import CheckpointMismatchError, deferred_init, load_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
# a mid-size LLM on the tiny image side: 52 M parameters, 198 MiB in float32, largest tensor 62.5 MiB
MID_LLM = {"vocab_size": 32000, "hidden_size": 512, "num_layers": 6, "num_heads": 8, "intermediate_size": 2048}
MiB = 1 << 20
SLACK = 48 * MiB  # Python objects of the cells, allocator rounding


@pytest.fixture(scope="module")
def tiny():
    """The tiny demo model (random weights from its seed)."""
    model, _ = visual_mllm.load_from_yaml(TINY)
    return model


def values(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def save(path, arrays, dtype=None):
    """arrays {name: numpy} written with MindSpore's own writer (.ckpt or .safetensors), as `dtype`."""
    records = [{"name": name, "data": ms.Tensor(array) if dtype is None else ms.Tensor(array).astype(dtype)}
               for name, array in arrays.items()]
    ms.save_checkpoint(records, str(path), format="safetensors" if str(path).endswith(".safetensors") else "ckpt")
    return str(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("dtype", [ms.float32, ms.float16, ms.bfloat16])
def test_every_format_and_dtype_loads_exactly(tiny, tmp_path, suffix, dtype):
    """Each parameter gets the file's values in its own dtype (numpy's rounding, as before)."""
    path = save(tmp_path / f"weights{suffix}", values(tiny), dtype)
    model, _ = visual_mllm.load_from_yaml(TINY, checkpoint_name_or_path=path)
    stored = ms.load_checkpoint(path, format=suffix[1:])
    for param in model.get_parameters():
        assert not param.has_init, param.name
        expected = stored[param.name].asnumpy().astype(numpy_dtype(param.dtype))
        np.testing.assert_array_equal(param.asnumpy(), expected, err_msg=param.name)


def test_a_model_built_for_checkpoints_makes_no_random_weights(tiny):
    with deferred_init():
        model = type(tiny)(tiny.config)
    assert all(param.has_init for param in model.get_parameters())


def refused(model, paths, *fragments):
    """load_checkpoints refuses with a message holding every fragment, and changes nothing."""
    before = values(model)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoints(model, paths)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    after = values(model)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    return str(err.value)


def changed(model, **replace):
    """The model's values, as numpy, plus 1 (so that a load would show), with entries replaced/dropped."""
    arrays = {name: array + 1 for name, array in values(model).items()}
    for name, array in replace.items():
        name = name.replace("__", ".")
        if array is None:
            del arrays[name]
        else:
            arrays[name] = array
    return arrays


def test_mismatches_are_refused_before_any_tensor_is_read(tiny, tmp_path):
    bias = "image_encoder.projection.bias"
    missing = save(tmp_path / "missing.ckpt", changed(tiny, image_encoder__projection__bias=None))
    refused(tiny, [missing], "cannot load", "missing from the checkpoint(s): " + bias)
    extra = save(tmp_path / "extra.ckpt", changed(tiny, extra__weight=np.ones(3, np.float32)))
    refused(tiny, [extra], "not parameters of the model: extra.weight")
    shape = save(tmp_path / "shape.safetensors", changed(tiny, image_encoder__projection__bias=np.ones(3, np.float32)))
    refused(tiny, [shape], f"wrong shape: {bias} (3,) in {shape} != model (64,)")
    integer = save(tmp_path / "int8.ckpt", changed(tiny, image_encoder__projection__bias=np.ones(64, np.int8)))
    refused(tiny, [integer], f"wrong dtype: {bias} in {integer}: int8 (quantised) weights cannot fill the model's Float32")
    arrays = changed(tiny)
    first = save(tmp_path / "first.ckpt", {n: a for n, a in arrays.items() if n.startswith("image_encoder.")})
    second = save(tmp_path / "second.ckpt", {n: a for n, a in arrays.items() if n.startswith(("llm.", bias))})
    refused(tiny, [first, second], f"parameter {bias} is in both {first} and {second}")


def test_unreadable_files_are_named(tiny, tmp_path):
    arrays = changed(tiny)
    whole = save(tmp_path / "whole.ckpt", arrays)
    truncated = tmp_path / "truncated.ckpt"
    with open(whole, "rb") as file:
        truncated.write_bytes(file.read(os.path.getsize(whole) // 2))
    refused(tiny, [str(truncated)], f"cannot read checkpoint {truncated}")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nowhere.ckpt"):
        load_checkpoints(tiny, [str(tmp_path / "nowhere.ckpt")])
    load_checkpoints(tiny, [whole])  # a good file loads into a model that is already built too
    loaded = values(tiny)
    assert all(np.array_equal(loaded[name], array) for name, array in arrays.items())


MEASURE = r"""
import json, sys
from mindformers.models.build_config import build_model_config
from mindformers.models.build_model import build_model
from visual_mllm.registry import read_run_config

def status(key):
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) << 10 for line in file if line.startswith(key + ":"))

config = read_run_config(sys.argv[1], json.loads(sys.argv[2]))
config.model.model_config = build_model_config(config.model.model_config)
with open("/proc/self/clear_refs", "w") as file:
    file.write("5")  # peak RSS := current RSS (everything imported)
base = status("VmRSS")
model = build_model(config.model)
params = list(model.get_parameters())
print(json.dumps({"base": base, "peak": status("VmHWM"), "weights": sum(p.nbytes for p in params),
                  "largest": max(p.nbytes for p in params), "uninitialised": sum(p.has_init for p in params)}))
"""


@pytest.fixture(scope="module")
def mid_checkpoints(tmp_path_factory):
    """{dtype name: path} of random weights of the mid-size model: float32 .ckpt, float16 .safetensors."""
    folder = tmp_path_factory.mktemp("mid")
    with deferred_init():
        model, _ = visual_mllm.load_from_yaml(TINY, llm_config=MID_LLM)
    rng = np.random.default_rng(0)
    arrays = {p.name: (rng.standard_normal(p.shape, np.float32) * 0.02) for p in model.get_parameters()}
    return {"float32": save(folder / "mid.ckpt", arrays),
            "float16": save(folder / "mid_fp16.safetensors", arrays, ms.float16)}


@pytest.mark.parametrize("stored", ["float32", "float16"])
def test_build_and_load_peak_at_the_weights_plus_one_tensor(mid_checkpoints, stored):
    """Before streaming, a float32 file peaked at ~3x the weights (random init + the whole file as numpy
    + the converted copies); now: the weights the model holds, plus one tensor while it is converted."""
    overrides = {"llm_config": MID_LLM, "checkpoint_name_or_path": mid_checkpoints[stored]}
    result = subprocess.run([sys.executable, "-c", MEASURE, TINY, json.dumps(overrides)], capture_output=True,
                            text=True, timeout=600, cwd=REPO, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["uninitialised"] == 0
    assert measured["weights"] > 150 * MiB
    grown = measured["peak"] - measured["base"]
    bound = measured["weights"] + (measured["largest"] if stored != "float32" else 0) + SLACK
    assert grown < bound, f"build + load grew RSS by {grown / MiB:.0f} MiB: weights {measured['weights'] / MiB:.0f} MiB"
