"""run_infer.py and export_lite_model.py, as a user runs them, on the converted MiniGPT-4 and MiniGPT4Qwen
fixtures: every recorded turn of every reference sample, asked as JSONL requests (history included), gives
the reference tokens and answers in one batch, through the mindformers pipeline in batches of two, and
through the exported graphs (--mode lite).
"""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from test_convert_minigpt4 import FAMILIES, new_tokens, turns


def run(script, cwd, *args):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(cwd / "log"))
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr[-3000:]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    """(family, converted run YAML, work folder with requests.jsonl, the expected turns)."""
    family = request.param
    output = request.getfixturevalue(f"converted_{family}")
    folder = tmp_path_factory.mktemp(f"run_infer_{family}")
    expected = turns(family)
    lines = [{"image": t.request.image, "prompt": t.request.prompt, "history": [list(h) for h in t.request.history]}
             for t in expected]
    (folder / "requests.jsonl").write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
                                           encoding="utf-8")
    return family, output / f"run_{family}.yaml", folder, expected


def answers(case, mode, *flags):
    family, config, folder, _ = case
    out = folder / f"{mode}.jsonl"
    run("run_infer.py", folder, "--config", config, "--input_file", "requests.jsonl", "--output_file", out,
        "--do_sample", "False", "--max_new_tokens", new_tokens(family), "--mode", mode, *flags)
    return read_jsonl(out)


def assert_reference(records, expected):
    assert [r["generated_ids"] for r in records] == [t.generated_ids for t in expected]
    assert [r["response"] for r in records] == [t.answer for t in expected]


def test_one_batch_of_every_turn(case):
    assert_reference(answers(case, "generate", "--batch_size", len(case[3])), case[3])


def test_pipeline_in_batches_of_two(case):
    assert_reference(answers(case, "pipeline", "--batch_size", 2), case[3])


def test_exported_graphs(case):
    from visual_mllm import load_processor_from_yaml

    family, config, folder, expected = case
    processor = load_processor_from_yaml(config)
    longest = max(len(processor(t.request.prompt, t.request.image, t.request.history)["input_ids"]) for t in expected)
    seq_length = 32 * math.ceil((longest + new_tokens(family)) / 32)  # the context the graphs are exported for
    run("export_lite_model.py", folder, "--mode", "export", "--config", config, "--use_past", "True",
        "--seq_length", seq_length, "--batch_size", 2, "--output_dir", folder / "lite")
    assert_reference(answers(case, "lite", "--export_dir", folder / "lite", "--batch_size", 2), expected)
