"""`convert_weight.py --quantize int8`: the LLM's Linear weights written as weight-only int8 with their
per-channel scales, for every family. The files hold exactly what a float conversion quantised at load
holds (one quantiser), load with no flag, and say so in the YAML and the manifest; the ways that cannot
work (back to a release format, kept LoRA) are one clear error."""
import json

import mindspore as ms
import numpy as np
import pytest

from conftest import blip2_family_args, converted, fixture_path, run_converter

FAMILIES = ["visualglm", "minigpt4", "minigpt4qwen"]


def source_args(family):
    if family == "visualglm":
        return ["--torch_path", fixture_path("visualglm", "sat", "visualglm-tiny")]
    return blip2_family_args(family)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def quantized_output(family, tmp_path_factory):
    """The float32 fixture converted with --quantize int8 --dtype fp16 (int8 Linear weights, float16 rest)."""
    return converted(tmp_path_factory.mktemp(f"int8_{family}"), *source_args(family), "--quantize", "int8",
                     "--dtype", "fp16")


def test_int8_conversion_equals_quantising_at_load(family, quantized_output, request):
    import yaml
    from visual_mllm import load_from_yaml
    from visual_mllm.registry import precision_overrides

    ms.set_context(mode=ms.GRAPH_MODE)
    float_yaml = request.getfixturevalue(f"converted_{family}") / f"run_{family}.yaml"
    int8_yaml = quantized_output / f"run_{family}.yaml"
    assert yaml.safe_load(int8_yaml.read_text())["model"]["model_config"]["llm_config"]["quantize"] == "int8"
    overrides = precision_overrides(param_dtype="float16", quantize="int8")
    at_load = dict(load_from_yaml(float_yaml, **overrides)[0].parameters_and_names())
    written = dict(load_from_yaml(int8_yaml)[0].parameters_and_names())  # no flag: the YAML says int8
    assert sorted(written) == sorted(at_load)
    int8 = [name for name, param in written.items() if param.dtype == ms.int8]
    exact = set(int8) | {name + "_scale" for name in int8}  # one quantiser, from the same float32 values
    for name, param in written.items():
        assert param.dtype == at_load[name].dtype, name
        if name in exact:
            np.testing.assert_array_equal(param.asnumpy(), at_load[name].asnumpy(), err_msg=name)
        else:  # --dtype fp16 also rounds what the model holds in float32 (norms, biases)
            np.testing.assert_allclose(param.asnumpy(), at_load[name].asnumpy(), rtol=2 ** -11, atol=2 ** -25,
                                       err_msg=name)  # half an fp16 step (subnormals: absolute)
    assert int8 and all(name.startswith("llm.") and "lm_head" not in name for name in int8)
    manifest = json.loads((quantized_output / "manifest.json").read_text())
    assert manifest["quantize"]["llm"] == "int8" and manifest["quantize"]["tensors"] == len(int8)


def test_int8_scales_stay_float32_whatever_dtype(quantized_output):
    import yaml
    from visual_mllm.models.weights import read_checkpoint

    run = next(quantized_output.glob("run_*.yaml"))
    llm = yaml.safe_load(run.read_text())["model"]["model_config"]["llm_checkpoint"]
    dtypes = {name: str(layout.dtype) for name, layout in read_checkpoint(llm).items()}
    scales = [name for name in dtypes if name.endswith("_scale")]
    assert scales and {dtypes[name] for name in scales} == {"torch.float32"}
    assert {dtypes[name[:-len("_scale")]] for name in scales} == {"torch.int8"}
    assert "torch.float16" in dtypes.values()  # the rest of the LLM as --dtype says


def test_int8_conversion_cannot_go_back_to_a_release(family, quantized_output, tmp_path):
    result = run_converter(tmp_path, "--model_type", family, "--mindspore_config",
                           quantized_output / f"run_{family}.yaml", "--output_dir", tmp_path / "back")
    assert result.returncode == 2
    assert "quantised (int8)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "back").exists()


def test_quantize_is_refused_with_mindspore_config(tmp_path):
    result = run_converter(tmp_path, "--mindspore_config", tmp_path / "run.yaml", "--output_dir", tmp_path / "x",
                           "--quantize", "int8")
    assert result.returncode == 2 and "--quantize int8: only when converting to MindSpore" in result.stderr
