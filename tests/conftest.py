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


def load_json(*parts):
    with open(fixture_path(*parts), encoding="utf-8") as f:
        return json.load(f)
