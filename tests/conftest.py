"""Shared test helpers: where the reference fixtures are, and a clean working directory.

Fixtures are found through VISUAL_MLLM_FIXTURES (default: ../shared/fixtures beside the checkout).
Tests that need them skip with the reason when they are absent.
"""
import json
import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# mindformers writes logs under the working directory on import: keep them out of the checkout.
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "visual_mllm_test_output"))


def fixtures_root():
    return Path(os.environ.get("VISUAL_MLLM_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def fixture_path(*parts):
    """Path inside the fixtures folder, or skip the calling test saying what is missing."""
    path = fixtures_root().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not found (set VISUAL_MLLM_FIXTURES to the shared/fixtures folder)")
    return path


def npz_prefix(sample, arrays=None):
    """The npz key prefix of a reference sample: its name up to the first `_` (`s1_image_two_turn` -> `s1`).

    With `arrays`, checks that the npz really holds that sample under the prefix (same prompt ids)."""
    prefix = sample["name"].split("_", 1)[0]
    if arrays is not None:
        assert f"{prefix}_input_ids" in arrays, f"{sample['name']}: no {prefix}_input_ids in the npz"
        assert arrays[f"{prefix}_input_ids"].tolist() == sample["input_ids"], f"{sample['name']}: npz prefix {prefix}"
    return prefix


def case_params(*parts):
    """One pytest parameter per case of a fixture's cases file (its "cases" list, ids = case names), or
    one skipped parameter saying what is missing when the fixtures are absent (for @parametrize)."""
    path = fixtures_root().joinpath(*parts)
    if not path.is_file():
        reason = f"fixture {path} not found (set VISUAL_MLLM_FIXTURES to the shared/fixtures folder)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    with open(path, encoding="utf-8") as cases_file:
        return [pytest.param(case, id=case["name"]) for case in json.load(cases_file)["cases"]]


def steps_where_margins_allow(name, got, expected, margins, error, label):
    """Greedy step indices checked: `got` equals `expected` at each step up to the first whose reference top1-top2
    margin is not above twice the measured logit `error` (a rounding may flip that step; nothing after it is
    comparable). Prints what was checked."""
    steps = []
    for step, (want, margin) in enumerate(zip(expected, margins)):
        if margin <= 2 * error:
            break
        assert got[step] == want, (f"{name} step {step}: {got[step]} != {want} although the margin {margin:.3g} "
                                   f"> 2 x the measured {label} logit error {error:.3g}")
        steps.append(step)
    print(f"{name}: {label} logit error {error:.2e}; checked steps {steps}")
    return steps


def load_json(*parts):
    with open(fixture_path(*parts), encoding="utf-8") as f:
        return json.load(f)


def run_converter(out, *args):
    """`convert_weight.py ARGS` as a user runs it (a subprocess in `out`); returns the finished process."""
    import subprocess
    import sys

    script = REPO_ROOT / "convert_weight.py"
    if not script.exists():
        pytest.skip("convert_weight.py is not written yet")
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(out / "log"))
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=out, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)


def converted(out, *args):
    """The output folder of a conversion that must succeed: `convert_weight.py ARGS --output_dir out/model`."""
    result = run_converter(out, *args, "--output_dir", out / "model")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "model"


@pytest.fixture(scope="session")
def converted_visualglm(tmp_path_factory):
    """The tiny SAT fixture converted by `convert_weight.py` as a user runs it: the output folder.

    The folder holds the split checkpoints, manifest.json and exactly one YAML for run_infer.py.
    """
    source = fixture_path("visualglm", "sat", "visualglm-tiny")
    return converted(tmp_path_factory.mktemp("converted_visualglm"), "--torch_path", source)


# The four sources of each MiniGPT-4-style fixture (--eva_vit_path, --qformer_path, --proj_path, --llm_path).
BLIP2_FAMILY_SOURCES = {
    "minigpt4": (("minigpt4", "eva_vit_g.pth"), ("minigpt4", "blip2_pretrained_flant5xxl.pth"),
                 ("minigpt4", "pretrained_minigpt4.pth"), ("minigpt4", "vicuna-tiny")),
    "minigpt4qwen": (("minigpt4qwen", "ckpt", "eva", "eva_vit_g.pth"),
                     ("minigpt4qwen", "ckpt", "blip2", "blip2_pretrained_flant5xxl.pth"),
                     ("minigpt4qwen", "model.pth"), ("minigpt4qwen", "ckpt", "Qwen7B-chat")),
}
SOURCE_FLAGS = ("--eva_vit_path", "--qformer_path", "--proj_path", "--llm_path")


def blip2_family_heads(family):
    """(ViT heads, Q-Former heads) of a fixture: in no weight file, so read from the fixture's own records."""
    if family == "minigpt4":
        sizes = load_json("minigpt4", "reference.json")["sizes"]
        return sizes["vit"]["num_heads"], sizes["qformer_bert_config"]["num_attention_heads"]
    vit = load_json("minigpt4qwen", "reference.json")["meta"]["sizes"]["vit"]
    return vit["heads"], load_json("minigpt4qwen", "ckpt", "bert-base-uncased", "config.json")["num_attention_heads"]


def blip2_family_args(family, **replace):
    """convert_weight.py arguments for a fixture; `replace` = {flag without dashes: path} swaps a source."""
    args = ["--model_type", family]
    for flag, parts in zip(SOURCE_FLAGS, BLIP2_FAMILY_SOURCES[family]):
        args += [flag, replace.get(flag[2:], fixture_path(*parts))]
    vit_heads, qformer_heads = blip2_family_heads(family)
    return args + ["--vit_num_heads", vit_heads, "--qformer_num_heads", qformer_heads]


@pytest.fixture(scope="session")
def converted_minigpt4(tmp_path_factory):
    """The tiny MiniGPT-4 fixture (EVA, BLIP-2, llama_proj, Vicuna safetensors) converted by convert_weight.py."""
    return converted(tmp_path_factory.mktemp("converted_minigpt4"), *blip2_family_args("minigpt4"))


@pytest.fixture(scope="session")
def converted_minigpt4qwen(tmp_path_factory):
    """The tiny MiniGPT4Qwen fixture (EVA, BLIP-2, model.pth's llm_proj, Qwen v1) converted by convert_weight.py."""
    return converted(tmp_path_factory.mktemp("converted_minigpt4qwen"), *blip2_family_args("minigpt4qwen"))


def cogvlm_args():
    """convert_weight.py arguments for the tiny cogvlm-chat-hf fixture and its Vicuna tokenizer folder."""
    return ["--model_type", "cogvlm", "--torch_path", fixture_path("cogvlm", "cogvlm-chat-hf"),
            "--tokenizer", fixture_path("cogvlm", "vicuna-7b-v1.5")]


@pytest.fixture(scope="session")
def converted_cogvlm(tmp_path_factory):
    """The tiny CogVLM fixture (cogvlm-chat-hf layout + vicuna tokenizer) converted by convert_weight.py."""
    return converted(tmp_path_factory.mktemp("converted_cogvlm"), *cogvlm_args())
