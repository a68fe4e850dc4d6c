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
import yaml

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
    """The finished run_infer.py process; stdout/stderr decoded without newline translation (answers may
    hold \\r or any other character a random model emits)."""
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(workdir / "output"))
    result = subprocess.run([sys.executable, RUN_INFER, "--config", str(config), *args], cwd=workdir, env=env,
                            input=None if stdin is None else stdin.encode("utf-8"), capture_output=True,
                            timeout=600, stdin=None if stdin is not None else subprocess.DEVNULL)
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def greedy(reference):
    return ["--do_sample", "False", "--max_new_tokens", str(reference["n_new_tokens"])]


def assert_prints_answers(stdout, responses):
    """stdout holds `answer: <response>` + newline for every response, in order. Found as whole strings,
    not by splitting lines: a response may contain any line-break character."""
    position = 0
    for response in responses:
        line = f"answer: {response}\n"
        found = stdout.find(line, position)
        assert found >= 0, f"{line!r} not printed (after offset {position}) in {stdout!r}"
        position = found + len(line)


RUNS = {  # name -> flags for n samples, on samples.jsonl
    "one_by_one_streaming": lambda n: ["--batch_size", "1", "--stream", "True"],
    "one_batch": lambda n: ["--batch_size", str(n), "--stream", "False"],
    # a full batch, then a partial one (with 3+ samples)
    "pipeline_full_and_partial_batch": lambda n: ["--mode", "pipeline", "--batch_size", str(max(2, n - 1))],
}


@pytest.fixture(scope="module")
def runs(workdir, config, reference):
    """name -> (stdout, output records) of each way of answering samples.jsonl."""
    out = {}
    for name, flags in RUNS.items():
        result = run_infer(workdir, config, "--input_file", "samples.jsonl", "--output_file", f"{name}.jsonl",
                           *greedy(reference), *flags(len(reference["samples"])))
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
    responses = [s["response"] for s in reference["samples"]]
    assert_prints_answers(runs["one_by_one_streaming"][0], responses)
    assert_prints_answers(runs["one_batch"][0], responses)


def askable(question):
    """Whether a question can be typed as one line of a --chat session (which strips each line)."""
    return question == question.strip() and len(question.splitlines()) == 1 and not question.startswith("/")


def chat_steps(sample):
    """The --chat lines that ask a reference sample without history: its image (or none), its question."""
    return [f"/image {sample['image'] or 'none'}", sample["query"]]


def test_chat_session(workdir, config, reference):
    samples = reference["samples"]
    image_samples = [s for s in samples if s["image"] and askable(s["query"])]
    if not image_samples:
        pytest.skip("the fixture has no image sample whose question fits one chat line")
    # a conversation about one image: two questions, the second with the first as history
    talk = next((s for s in image_samples if s["history"] and askable(s["history"][0][0])), image_samples[0])
    first_question = talk["history"][0][0] if talk["history"] else talk["query"]
    # every sample without history is asked in a session of its language and must give its tokens
    fresh = [s for s in samples if not s["history"] and askable(s["query"])]
    english = talk["english"]
    same_language = [s for s in fresh if s["english"] == english]
    seq_length = yaml.safe_load(config.read_text(encoding="utf-8"))["model"]["model_config"]["seq_length"]
    too_long = " ".join(["长"] * (seq_length + 1))  # at least one token per word: over the context
    script = [
        "/help",
        f"/image {talk['image']}",
        first_question,                      # turn 0
        talk["query"],                       # turn 1: with turn 0 as history
        "/history",
        "/clear",
        "/history",
        talk["query"],                       # turn 2: same image, no history
        *[line for sample in same_language for line in chat_steps(sample)],  # the reference samples
        too_long,                            # does not fit: an error, the session goes on
        "/image images/no_such_image.png",
        "/bogus",
        "/quit",
    ]
    result = run_infer(workdir, config, "--chat", "--english", str(english), "--output_file", "chat.jsonl",
                       *greedy(reference), stdin="\n".join(script) + "\n")
    turns = read_jsonl(workdir / "chat.jsonl")
    assert [t["prompt"] for t in turns] == [first_question, talk["query"], talk["query"]] + \
        [s["query"] for s in same_language]
    assert turns[1]["history"] == [[first_question, turns[0]["response"]]]
    assert turns[2]["history"] == [] and turns[2]["image"] == talk["image"]
    for turn, sample in zip(turns[3:], same_language):
        assert turn["image"] == sample["image"] and turn["history"] == [], sample["name"]
        assert turn["generated_ids"] == sample["generated_ids"], sample["name"]
        assert turn["response"] == sample["response"], sample["name"]
    text = result.stdout
    assert "/clear" in text and "/history" in text  # the help
    assert f"image {talk['image']}; 2 turn(s)" in text and f"Q: {first_question}" in text
    assert "history cleared" in text and f"image {talk['image']}; 0 turn(s)" in text
    assert "over by" in text and "no_such_image.png" in text and "unknown command /bogus" in text

    other_language = [s for s in fresh if s["english"] != english]
    if other_language:  # a second session in the other language
        steps = [line for sample in other_language for line in chat_steps(sample)]
        run_infer(workdir, config, "--chat", "--english", str(not english), "--output_file", "chat_other.jsonl",
                  *greedy(reference), stdin="\n".join(steps + ["/quit"]) + "\n")
        other = read_jsonl(workdir / "chat_other.jsonl")
        assert [t["generated_ids"] for t in other] == [s["generated_ids"] for s in other_language]

    # The chat's turns asked as JSONL requests (history included) give the same tokens.
    write_jsonl(workdir / "replay.jsonl", [{k: t[k] for k in ("image", "prompt", "history", "english")}
                                           for t in turns[:3]])
    run_infer(workdir, config, "--input_file", "replay.jsonl", "--output_file", "replay_out.jsonl",
              *greedy(reference))
    assert [r["generated_ids"] for r in read_jsonl(workdir / "replay_out.jsonl")] == \
        [t["generated_ids"] for t in turns[:3]]
