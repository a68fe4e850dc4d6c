"""run_infer.py as a user runs it: the built-in demo (its 2 lines only, nothing left in the folder, and a second
run that loads every graph from the compile cache), the example requests, bare and valued boolean flags, and
clear one-line errors (exit 2, no traceback unless --verbose). The tiny demo model needs no fixture; tests/test_run_infer_e2e.py checks the
answers of a converted model against the reference."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from visual_mllm.paths import DEMO_IMAGE

RUN_INFER = os.path.join(REPO_ROOT, "run_infer.py")


def run(tmp_path, *args):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "output"))
    return subprocess.run([sys.executable, RUN_INFER, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


FRAMEWORK_SETTINGS = ("LOCAL_DEFAULT_PATH", "LOG_MF_PATH", "MS_OM_PATH", "GLOG_v", "VISUAL_MLLM_VERBOSE")


def as_a_newcomer(script, *args, folder, cache):
    """`python SCRIPT ARGS` run from an empty `folder` with none of the frameworks' log settings."""
    env = {k: v for k, v in os.environ.items() if k not in FRAMEWORK_SETTINGS}
    env["VISUAL_MLLM_CACHE"] = str(cache)
    folder.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's first command after the install: `python run_infer.py`, from an empty folder."""
    base = tmp_path_factory.mktemp("demo")
    result = as_a_newcomer("run_infer.py", folder=base / "work", cache=base / "cache")
    return result, base


def test_demo_prints_its_request_and_answer_only_and_leaves_the_folder_empty(demo_run):
    result, base = demo_run
    assert result.returncode == 0, result.stderr
    # 2 lines: the request, then the answer (before issue 13: 8 mindformers warnings on stdout, 43
    # MindSpore deprecation notices on stderr, and output/log/rank_0/{info,error}.log in the folder)
    assert result.stdout.splitlines() == [
        f"[image: {DEMO_IMAGE}] 描述这张图片。",
        "answer: 一只虎斑猫正看着镜头，它有一双绿色的眼睛。"]
    assert result.stderr == ""
    assert os.listdir(base / "work") == []


def test_help_and_a_bad_flag_leave_the_folder_empty(tmp_path):
    helped = as_a_newcomer("export_lite_model.py", "--help", folder=tmp_path / "work", cache=tmp_path / "cache")
    assert helped.returncode == 0 and "--verbose" in helped.stdout and helped.stderr == ""
    failed = as_a_newcomer("run_infer.py", "--image_path", "nope.png", "--verbose", folder=tmp_path / "work",
                           cache=tmp_path / "cache")
    assert failed.returncode == 2
    assert "Traceback" in failed.stderr  # --verbose: the traceback, then the one line
    assert failed.stderr.splitlines()[-1] == ("error: request 1 (--image_path/--prompt): image file not found: "
                                              "./nope.png")
    assert os.listdir(tmp_path / "work") == []


def test_text_only_and_several_requests_in_one_batch(tmp_path):
    result = run(tmp_path, "--max_new_tokens", "4", "--batch_size", "2", "--prefill_mode", "pynative",
                 "--image_path", "none", "--prompt", "你好，你是谁？",
                 "--image_path", os.path.join(REPO_ROOT, "examples", "images", "coffee.png"), "--prompt", "这是什么？")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("answer:") == 2
    assert "text-only" in result.stdout


def test_example_inputs_in_pipeline_mode(tmp_path):
    example = os.path.join(REPO_ROOT, "examples", "example_inputs.jsonl")
    with open(example, encoding="utf-8") as f:
        requests = [json.loads(line) for line in f if line.strip()]
    assert len(requests) % 2, "an odd count exercises a last batch smaller than --batch_size"
    out = tmp_path / "answers.jsonl"
    result = run(tmp_path, "--mode", "pipeline", "--input_file", example, "--batch_size", "2",
                 "--max_new_tokens", "4", "--do_sample", "False", "--output_file", str(out))
    assert result.returncode == 0, result.stderr
    with open(out, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [{k: r[k] for k in request} for r, request in zip(records, requests)] == requests  # input order
    assert len(records) == len(requests)
    for record in records:
        assert 1 <= len(record["generated_ids"]) <= 4 and isinstance(record["response"], str)
        assert set(record["timings"]) >= {"image_encode_ms", "first_token_ms", "decode_tokens_per_s"}


BAD_CASES = ["missing_image", "corrupt_image", "prompt_too_long", "unknown_key", "bad_bool", "jsonl_not_json",
             "jsonl_missing_image", "jsonl_unknown_field", "missing_checkpoint", "missing_lora", "bf16_compute_on_cpu"]


@pytest.mark.parametrize("case", BAD_CASES)
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
    elif case == "bad_bool":
        args, expect = ["--use_past", "maybe"], "maybe"
    elif case == "jsonl_not_json":
        (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b",\n', encoding="utf-8")
        args, expect = ["--input_file", str(tmp_path / "in.jsonl")], "in.jsonl line 3: not valid JSON"
    elif case == "jsonl_missing_image":
        (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "image": "gone.png"}\n',
                                           encoding="utf-8")
        args, expect = ["--input_file", str(tmp_path / "in.jsonl")], "in.jsonl line 2: image file not found"
    elif case == "jsonl_unknown_field":
        (tmp_path / "in.jsonl").write_text('{"prompt": "a", "imgae": "x.png"}\n', encoding="utf-8")
        args, expect = ["--input_file", str(tmp_path / "in.jsonl")], "in.jsonl line 1: unknown field(s) imgae"
    elif case == "missing_checkpoint":
        text = open(os.path.join(REPO_ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml"),
                    encoding="utf-8").read()
        keys = "".join(f"\n    {key}: {tmp_path / 'gone.ckpt'}" for key in
                       ("vit_checkpoint", "qformer_checkpoint", "llm_checkpoint"))
        (tmp_path / "ckpt.yaml").write_text(text.replace("    seq_length: 128", "    seq_length: 128" + keys),
                                            encoding="utf-8")
        args, expect = ["--config", str(tmp_path / "ckpt.yaml")], "model_config.vit_checkpoint"
    elif case == "bf16_compute_on_cpu":
        args, expect = ["--compute_dtype", "bfloat16"], "compute_dtype bfloat16 cannot run on the CPU"
    else:
        args, expect = ["--lora_checkpoint", str(tmp_path / "no_lora.ckpt")], "--lora_checkpoint: not found"
    result = run(tmp_path, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expect in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["visualglm", "minigpt4", "minigpt4qwen"])
def test_sampling_defaults_come_from_the_family_and_greedy_is_plain(family):
    from visual_mllm.cli.infer import build_parser, generation_config
    from visual_mllm.families import get

    demo = get(family).sampling
    default = generation_config(build_parser().parse_args([]), get(family), 7)
    assert default.do_sample == demo["do_sample"] and default.eos_token_id == 7
    for name, value in demo.items():
        assert getattr(default, name) == value, name
    greedy = generation_config(build_parser().parse_args(["--do_sample", "False"]), get(family), 7)
    assert (greedy.do_sample, greedy.repetition_penalty) == (False, 1.0)  # no demo penalty when greedy
    given = generation_config(build_parser().parse_args(["--do_sample", "True", "--top_p", "0.3"]), get(family), 7)
    assert given.do_sample and given.top_p == 0.3


def test_boolean_flags_take_the_bare_form_and_a_value():
    from visual_mllm.cli.infer import build_parser

    parse = build_parser().parse_args
    assert parse([]).english is False and parse([]).do_sample is None
    args = parse(["--english", "--do_sample", "--use_past", "false", "--stream", "0", "--graph_mode"])
    assert (args.english, args.do_sample, args.use_past, args.stream, args.graph_mode) == (True, True, False, False, True)
    assert parse(["--english", "True", "--do_sample", "no"]).english is True
    with pytest.raises(SystemExit):
        parse(["--english", "maybe"])


def test_the_same_request_again_loads_every_graph_from_the_compile_cache(demo_run):
    first, base = demo_run
    again = as_a_newcomer("run_infer.py", "--timings", folder=base / "work", cache=base / "cache")
    assert again.returncode == 0, again.stderr
    timings = [line for line in again.stdout.splitlines() if line.startswith("timings:")]
    print("\n".join(timings))
    cache_line = next(line for line in timings if "compile cache" in line)
    found = re.search(r": 0 graph\(s\) compiled and saved, (\d+) found there$", cache_line)
    assert found and int(found.group(1)) >= 3, cache_line  # the image encoder, embedding, prefill, decode
    assert [line for line in again.stdout.splitlines() if line.startswith("answer:")] == \
        [line for line in first.stdout.splitlines() if line.startswith("answer:")]
    assert os.listdir(base / "work") == []


def test_another_question_of_the_same_shapes_loads_the_graphs_and_answers_as_compiled_ones_do(demo_run):
    """The cache folder is keyed by the graphs a run compiles (batch, image, padded prompt length, cache slots),
    not by the words: another question of the demo's prompt bucket compiles nothing and gets the answer of a
    run that compiles its graphs."""
    _, base = demo_run
    question = ("--prompt", "这张图片里有什么？")
    cached = as_a_newcomer("run_infer.py", "--timings", *question, folder=base / "work", cache=base / "cache")
    compiled = as_a_newcomer("run_infer.py", "--no_compile_cache", *question, folder=base / "work",
                             cache=base / "cache")
    assert cached.returncode == 0 and compiled.returncode == 0, cached.stderr + compiled.stderr
    cache_line = next(line for line in cached.stdout.splitlines() if "compile cache" in line)
    assert re.search(r": 0 graph\(s\) compiled and saved, \d+ found there$", cache_line), cache_line
    answers = [[line for line in run.stdout.splitlines() if line.startswith("answer:")] for run in (cached, compiled)]
    assert answers[0] == answers[1] and len(answers[0]) == 1
