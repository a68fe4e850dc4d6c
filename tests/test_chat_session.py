"""The --chat session logic (visual_mllm.chat.ChatSession) with a stand-in for the model: commands,
history carried across turns, the context budget, errors that do not end the session.
tests/test_run_infer_e2e.py runs a real session through run_infer.py."""
import io

import pytest

from conftest import fixture_path, load_json
from visual_mllm.chat import ChatSession
from visual_mllm.inference import ChatResult

KEEP = 2  # the stand-in model's context holds this many earlier turns


class FakeModel:
    """run(requests, stream) answering "answer N" and keeping only the last KEEP turns, as prepare() would."""

    def __init__(self):
        self.requests = []

    def __call__(self, requests, stream):
        (request,) = requests
        self.requests.append(request)
        kept = list(request.history)[-KEEP:]
        return [ChatResult(f"answer {len(self.requests)}", [len(self.requests)], [], kept)]


def fixture_image():
    """Path of an image of the reference samples (any one: the session only needs a loadable image)."""
    images = [s["image"] for s in load_json("visualglm", "reference.json")["samples"] if s.get("image")]
    if not images:
        pytest.skip("the VisualGLM fixture has no sample with an image")
    return str(fixture_path("visualglm", images[0]))


@pytest.fixture
def session():
    out, turns = io.StringIO(), []
    chat = ChatSession(FakeModel(), on_turn=lambda fields, result: turns.append((fields, result)), out=out)
    return chat, out, turns


def feed(chat, lines):
    lines = iter(lines)

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat.loop(read)


def test_history_is_carried_and_trimmed_to_the_context(session):
    chat, out, turns = session
    image = fixture_image()
    feed(chat, [f"/image {image}", "q1", "q2", "q3", "q4", "/history"])
    requests = chat.run.requests
    assert [r.prompt for r in requests] == ["q1", "q2", "q3", "q4"]
    assert all(r.image is not None for r in requests)  # the image goes with every turn
    assert requests[1].history == [("q1", "answer 1")]
    assert requests[3].history == [("q1", "answer 1"), ("q2", "answer 2"), ("q3", "answer 3")]
    assert "the 1 oldest turn(s) were dropped" in out.getvalue()  # said, not silent
    assert chat.history == [("q2", "answer 2"), ("q3", "answer 3"), ("q4", "answer 4")]
    assert "3 turn(s)" in out.getvalue() and "Q: q4" in out.getvalue()
    assert turns[3][0] == {"image": image, "prompt": "q4", "history": [["q2", "answer 2"], ["q3", "answer 3"]],
                           "english": False}


def test_commands(session):
    chat, out, _ = session
    image = fixture_image()
    feed(chat, ["/help", "text question", f"/image {image}", "q", "/clear", "/history", "q again",
                "/image none", "q text", "/image /no/such.png", "/image", "/bogus", "/quit", "never read"])
    text = out.getvalue()
    prompts = [(r.prompt, r.image is not None, len(r.history)) for r in chat.run.requests]
    assert prompts == [("text question", False, 0), ("q", True, 0), ("q again", True, 0), ("q text", False, 0)]
    assert "/clear" in text and "/quit" in text  # the help
    assert "history cleared" in text and "0 turn(s)" in text
    assert "new conversation: no image" in text
    assert "error: cannot load image '/no/such.png'" in text
    assert "error: /image needs a path" in text
    assert "unknown command /bogus" in text


def test_turn_errors_do_not_end_the_session(session):
    chat, out, _ = session

    def refuse(requests, stream):
        raise ValueError("prompt too long: ... over by 3 token(s)")

    chat.run = refuse
    feed(chat, ["q1", "/history"])
    assert "error: prompt too long" in out.getvalue() and "0 turn(s)" in out.getvalue()
