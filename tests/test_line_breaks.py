"""Answers may hold any character a model emits, including the ones `str.splitlines()` breaks at.

A random-weight model emits \\x0b, \\x0c, \\x1c-\\x1e, \\x85 or \\u2028 as readily as any other text.
Streaming, the printed `answer:` line, the JSONL records and the chat history must carry them
unchanged, and a JSONL record must stay one line for readers that split with `splitlines()`.
"""
import io
import json
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest

from visual_mllm.chat import ChatSession
from visual_mllm.cli.infer import answer_all
from visual_mllm.generation.streamer import TextStreamer
from visual_mllm.inference import ChatResult
from visual_mllm.request_file import read_requests, request_from_fields, result_record, write_record

# every character str.splitlines() treats as a line boundary
BREAKS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
ANSWERS = [f"前{char}后 end{char}" for char in BREAKS]


def test_the_characters_are_line_breaks():
    """The premise: each answer is several lines to splitlines(), so a test that splits would break it."""
    for answer in ANSWERS:
        assert len(answer.splitlines()) > 1, repr(answer)


@pytest.mark.parametrize("answer", ANSWERS, ids=[repr(c) for c in BREAKS])
def test_streamer_prints_the_answer_unchanged(answer):
    out = io.StringIO(newline="")  # no newline translation: what is written is what is read
    streamer = TextStreamer(render=lambda ids: answer[:len(ids)], stream=out)
    for _ in answer:
        streamer.put([1])
    streamer.put([-1])  # the row has finished
    streamer.end()
    assert out.getvalue() == answer + "\n"


class EchoModel:
    """run(requests, stream) answering ANSWERS in turn, with the whole history kept."""

    def __init__(self):
        self.calls = 0

    def __call__(self, requests, stream):
        results = []
        for request in requests:
            results.append(ChatResult(ANSWERS[self.calls % len(ANSWERS)], [self.calls], [], list(request.history)))
            self.calls += 1
        return results


def test_printed_answers_and_records_round_trip(tmp_path):
    fields = [{"image": None, "prompt": f"q{n}", "history": [], "english": False} for n in range(len(ANSWERS))]
    requests = [(f, request_from_fields(f)) for f in fields]
    path = tmp_path / "out.jsonl"
    printed = io.StringIO(newline="")
    with open(path, "w", encoding="utf-8") as file, redirect_stdout(printed):
        answer_all(SimpleNamespace(batch_size=4), EchoModel(), requests, stream=False,
                   report=lambda fields, result: write_record(file, result_record(fields, result)))
    text = printed.getvalue()
    position = 0
    for answer in ANSWERS:
        line = f"answer: {answer}\n"
        position = text.find(line, position)
        assert position >= 0, repr(answer)
        position += len(line)
    data = path.read_bytes().decode("utf-8")
    assert len(data.splitlines()) == len(ANSWERS)  # one record per line for any reader
    assert [json.loads(line)["response"] for line in data.splitlines()] == ANSWERS


def test_chat_history_carries_the_answers(tmp_path):
    out, records = io.StringIO(newline=""), []
    chat = ChatSession(EchoModel(), on_turn=lambda fields, result: records.append(result_record(fields, result)),
                       out=out)
    questions = [f"question {n}" for n in range(len(ANSWERS))]
    for question in questions:
        chat.handle(question)
    assert chat.history == list(zip(questions, ANSWERS))
    for answer in ANSWERS:
        assert f"answer: {answer}\n" in out.getvalue()
    chat.handle("/history")
    for number, (question, answer) in enumerate(chat.history, 1):
        assert f"  {number}. Q: {question}\n     A: {answer}\n" in out.getvalue()
    # the last turn's record, as run_infer.py writes it, read back as a request: the same history
    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            write_record(file, {k: record[k] for k in ("image", "prompt", "history", "english")})
    (_, request), = read_requests(str(path))[-1:]
    assert list(request.history) == list(zip(questions, ANSWERS))[:-1]
