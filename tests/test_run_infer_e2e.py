"""run_infer.py end to end on the converted tiny VisualGLM (the `converted_visualglm` fixture: the SAT
fixture converted by convert_weight.py), in subprocesses, as a user runs it.

Every request comes from the fixture's reference.json (prompts, history, images, English flag) and
must give the reference `generated_ids` and `response`: one by one, as one batch, and in pipeline mode;
streaming prints what non-streaming prints; a scripted --chat session carries its history and runs
every command.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, fixture_path, load_json

RUN_INFER = os.path.join(REPO_ROOT, "run_infer.py")


@pytest.fixture(scope="module")
def reference():
    return load_json("visualglm", "reference.json")


@pytest.fixture(scope="module")
def config(converted_visualglm):
    yamls = sorted(converted_visualglm.glob("*.yaml"))
    assert len(yamls) == 1, f"expected one YAML in {converted_visualglm}, found {yamls}"
    return yamls[0]


def request_fields(sample):
    fields = {"prompt": sample["query"], "history": sample["history"], "english": sample["english"]}
    if sample["image"]:
        fields["image"] = sample["image"]  # relative to the fixture folder, like images/ beside the JSONL
    return fields


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, reference):
    """A folder with samples.jsonl (every reference sample) and images/ = the fixture's images."""
    folder = tmp_path_factory.mktemp("run_infer_e2e")
    os.symlink(fixture_path("visualglm", "images"), folder / "images")
    write_jsonl(folder / "samples.jsonl", [request_fields(s) for s in reference["samples"]])
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_infer(workdir, config, *args, stdin=None):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(workdir / "output"))
    result = subprocess.run([sys.executable, RUN_INFER, "--config", str(config), *args], cwd=workdir, env=env,
                            input=stdin, capture_output=True, text=True, timeout=600,
                            stdin=None if stdin is not None else subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def greedy(reference):
    return ["--do_sample", "False", "--max_new_tokens", str(reference["n_new_tokens"])]


def answer_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("answer: ")]


RUNS = {  # name -> flags, on samples.jsonl
    "one_by_one_streaming": ["--batch_size", "1", "--stream", "True"],
    "one_batch": ["--batch_size", "3", "--stream", "False"],
    "pipeline_batches_of_2": ["--mode", "pipeline", "--batch_size", "2"],
}


@pytest.fixture(scope="module")
def runs(workdir, config, reference):
    """name -> (stdout, output records) of each way of answering samples.jsonl."""
    assert len(reference["samples"]) == 3, "RUNS' batch sizes assume 3 samples (a full and a partial batch)"
    out = {}
    for name, flags in RUNS.items():
        result = run_infer(workdir, config, "--input_file", "samples.jsonl", "--output_file", f"{name}.jsonl",
                           *greedy(reference), *flags)
        out[name] = (result.stdout, read_jsonl(workdir / f"{name}.jsonl"))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_answers_are_the_reference(runs, reference, name):
    _, records = runs[name]
    samples = reference["samples"]
    assert [r["generated_ids"] for r in records] == [s["generated_ids"] for s in samples]
    assert [r["response"] for r in records] == [s["response"] for s in samples]
    assert [{k: r[k] for k in request_fields(s)} for r, s in zip(records, samples)] == \
        [request_fields(s) for s in samples]
    for record in records:
        assert record["timings"]["new_tokens"] == len(record["generated_ids"])


def test_streaming_prints_what_non_streaming_prints(runs, reference):
    expected = [f"answer: {s['response']}" for s in reference["samples"]]
    assert answer_lines(runs["one_by_one_streaming"][0]) == expected
    assert answer_lines(runs["one_batch"][0]) == expected


def test_chat_session(workdir, config, reference):
    with_history = next(s for s in reference["samples"] if s["image"] and s["history"])
    image_only = next(s for s in reference["samples"] if s["image"] and not s["history"])
    text_only = next(s for s in reference["samples"] if not s["image"] and not s["history"])
    first_question = with_history["history"][0][0]
    script = [
        "/help",
        f"/image {with_history['image']}",
        first_question,                      # turn 0
        with_history["query"],               # turn 1: with turn 0 as history
        "/history",
        "/clear",
        "/history",
        with_history["query"],               # turn 2: same image, no history
        f"/image {image_only['image']}",
        image_only["query"],                 # turn 3: a reference sample
        "/image none",
        text_only["query"],                  # turn 4: a reference sample, text-only
        "长" * 400,                          # does not fit: an error, the session goes on
        "/image images/no_such_image.png",
        "/bogus",
        "/quit",
    ]
    result = run_infer(workdir, config, "--chat", "--output_file", "chat.jsonl", *greedy(reference),
                       stdin="\n".join(script) + "\n")
    turns = read_jsonl(workdir / "chat.jsonl")
    assert [t["prompt"] for t in turns] == [first_question, with_history["query"], with_history["query"],
                                           image_only["query"], text_only["query"]]
    assert turns[1]["history"] == [[first_question, turns[0]["response"]]]
    assert turns[2]["history"] == [] and turns[2]["image"] == with_history["image"]
    assert turns[3]["generated_ids"] == image_only["generated_ids"]
    assert turns[4]["image"] is None and turns[4]["generated_ids"] == text_only["generated_ids"]
    text = result.stdout
    assert "/clear" in text and "/history" in text  # the help
    assert f"image {with_history['image']}; 2 turn(s)" in text and f"Q: {first_question}" in text
    assert "history cleared" in text and f"image {with_history['image']}; 0 turn(s)" in text
    assert "over by" in text and "no_such_image.png" in text and "unknown command /bogus" in text

    # The chat's turns asked as JSONL requests (history included) give the same tokens.
    write_jsonl(workdir / "replay.jsonl", [{k: t[k] for k in ("image", "prompt", "history", "english")}
                                           for t in turns[:3]])
    run_infer(workdir, config, "--input_file", "replay.jsonl", "--output_file", "replay_out.jsonl",
              *greedy(reference))
    assert [r["generated_ids"] for r in read_jsonl(workdir / "replay_out.jsonl")] == \
        [t["generated_ids"] for t in turns[:3]]
