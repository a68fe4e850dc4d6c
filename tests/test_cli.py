"""run_infer.py as a user runs it: the built-in demo, and clear one-line errors (exit 2, no traceback)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

RUN_INFER = os.path.join(REPO_ROOT, "run_infer.py")


def run(tmp_path, *args):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "output"))
    return subprocess.run([sys.executable, RUN_INFER, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_demo_answers_the_example_image(tmp_path):
    result = run(tmp_path, "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "chelsea.png" in result.stdout
    assert "answer:" in result.stdout


def test_text_only_and_several_requests_in_one_batch(tmp_path):
    result = run(tmp_path, "--max_new_tokens", "4", "--batch_size", "2",
                 "--image_path", "none", "--prompt", "你好，你是谁？",
                 "--image_path", os.path.join(REPO_ROOT, "examples", "images", "coffee.png"), "--prompt", "这是什么？")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("answer:") == 2
    assert "text-only" in result.stdout


@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "prompt_too_long", "unknown_key", "bad_bool"])
def test_bad_input_is_one_clear_line(tmp_path, case):
    if case == "missing_image":
        args, expect = ["--image_path", str(tmp_path / "nope.png")], "nope.png"
    elif case == "corrupt_image":
        (tmp_path / "bad.png").write_bytes(b"not a png at all")
        args, expect = ["--image_path", str(tmp_path / "bad.png")], "bad.png"
    elif case == "prompt_too_long":
        args, expect = ["--prompt", "长" * 400], "over by"
    elif case == "unknown_key":
        text = open(os.path.join(REPO_ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml"),
                    encoding="utf-8").read().replace("seq_length: 128", "seq_lenght: 128")
        (tmp_path / "typo.yaml").write_text(text, encoding="utf-8")
        args, expect = ["--config", str(tmp_path / "typo.yaml")], "seq_lenght"
    else:
        args, expect = ["--use_past", "maybe"], "maybe"
    result = run(tmp_path, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expect in result.stderr
    assert "Traceback" not in result.stderr
