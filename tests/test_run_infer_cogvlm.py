"""run_infer.py as a user runs it on the converted CogVLM fixture: every turn of every reference sample (image
chat with history, text-only) as JSONL requests in one batch gives the reference tokens and the demo's answers;
a request's "template" field and --template choose CogVLM's vqa template; an unknown template is one error line."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, fixture_path, load_json


def run(cwd, *args):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(cwd / "log"))
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "run_infer.py"), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def turns():
    """[(JSONL request, reference turn)] of every turn of every sample."""
    out = []
    for sample in load_json("cogvlm", "reference.json")["samples"]:
        image = None if sample["image"] is None else str(fixture_path("cogvlm", sample["image"]))
        for turn in sample["turns"]:
            out.append(({"image": image, "prompt": turn["user_text"], "history": turn["history"]}, turn))
    return out


def test_every_turn_in_one_batch_and_the_vqa_template(converted_cogvlm, turns, tmp_path):
    requests = [request for request, _ in turns]
    vqa = dict(requests[0], template="vqa")
    write_jsonl(tmp_path / "requests.jsonl", requests + [vqa])
    result = run(tmp_path, "--config", converted_cogvlm / "run_cogvlm.yaml", "--input_file", "requests.jsonl",
                 "--output_file", "out.jsonl", "--max_new_tokens", 16, "--batch_size", len(requests) + 1)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["generated_ids"] for r in records[:-1]] == [turn["generated_ids"] for _, turn in turns]
    assert [r["response"] for r in records[:-1]] == [turn["response"] for _, turn in turns]
    assert records[-1]["template"] == "vqa" and records[-1]["generated_ids"] != records[0]["generated_ids"]


def test_the_template_flag_is_the_default_of_every_request(turns, tmp_path):
    """--template names the template of the --prompt requests and of JSONL lines without "template"."""
    from visual_mllm.cli.common import parse_command_line
    from visual_mllm.cli.infer import build_parser, requests_from_args

    write_jsonl(tmp_path / "requests.jsonl", [turns[0][0], dict(turns[0][0], template="base")])
    from_file = requests_from_args(parse_command_line(build_parser(), ["--input_file", str(tmp_path / "requests.jsonl"),
                                                                       "--template", "vqa"]))
    assert [request.template for _, request in from_file] == ["vqa", "base"]
    from_flags = requests_from_args(parse_command_line(build_parser(), ["--prompt", "Hi", "--image_path", "none",
                                                                        "--template", "vqa"]))
    assert [(fields["template"], request.template) for fields, request in from_flags] == [("vqa", "vqa")]


def test_an_unknown_template_is_one_error_line(converted_cogvlm, turns, tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [dict(turns[0][0], template="poem")])
    result = run(tmp_path, "--config", converted_cogvlm / "run_cogvlm.yaml", "--input_file", "bad.jsonl",
                 "--max_new_tokens", 2)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "'poem'" in result.stderr and "chat, vqa, base" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
