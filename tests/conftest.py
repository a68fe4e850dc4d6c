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


def load_json(*parts):
    with open(fixture_path(*parts), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def converted_visualglm(tmp_path_factory):
    """The tiny SAT fixture converted by `convert_weight.py` as a user runs it: the output folder.

    The folder holds the split checkpoints, manifest.json and exactly one YAML for run_infer.py.
    """
    import subprocess
    import sys

    script = REPO_ROOT / "convert_weight.py"
    if not script.exists():
        pytest.skip("convert_weight.py is not written yet")
    source = fixture_path("visualglm", "sat", "visualglm-tiny")
    out = tmp_path_factory.mktemp("converted_visualglm")
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(out / "log"))
    result = subprocess.run([sys.executable, str(script), "--torch_path", str(source), "--output_dir", str(out / "model")],
                            cwd=out, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "model"
