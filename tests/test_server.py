"""run_server.py as a user runs it (a subprocess on a free loopback port), talked to with the official `openai`
client: every family's converted fixture answers every reference sample (image, multi-turn, text-only) with
exactly the reference's greedy tokens, streamed and not (the stream adds up to the plain answer), with real
token counts; parallel clients each get their own answer in shared batches, none lost or doubled; bad
input gets the right status in OpenAI's error shape, and the server answers the next request.

One server per family (module-scoped); the requests come from the fixtures' reference files, exactly as
test_run_infer_e2e.py, test_run_infer_families.py and test_run_infer_cogvlm.py read them. A request's
"template" (CogVLM's prompt templates) reaches the prompt; a name the family lacks is a 400.
"""
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, fixture_path, load_json
from test_convert_minigpt4 import new_tokens, turns

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

API_KEY = "test-key-123"
FAMILIES = ["visualglm", "minigpt4", "minigpt4qwen", "cogvlm"]
# the batcher, the limits and the errors are family-neutral: those tests run on one family's server (the same
# module-scoped instance: an indirect parameter equal to one of the fixture's own)
ON_VISUALGLM = pytest.mark.parametrize("server", ["visualglm"], indirect=True)
ON_COGVLM = pytest.mark.parametrize("server", ["cogvlm"], indirect=True)  # the family with prompt templates


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(folder, *args, env=None, ready_timeout=600):
    """A run_server.py process with ARGS on a free port, once /health says ready: (base URL, log path)."""
    port = free_port()
    log_path = folder / "server.log"
    environment = dict(os.environ, LOCAL_DEFAULT_PATH=str(folder / "log"), **(env or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "run_server.py"), "--port", str(port),
                                    *map(str, args)], cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            assert process.poll() is None, f"the server exited:\n{log_path.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"not ready in time:\n{log_path.read_text(errors='replace')[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def data_url(path):
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
    return f"data:{mime[os.path.splitext(str(path))[1].lower()]};base64," + \
        base64.b64encode(open(path, "rb").read()).decode()


def conversation(image, history, question):
    """OpenAI messages: the earlier turns, then the question; the image with the first user message."""
    questions = [q for q, _ in history] + [question]
    answers = [a for _, a in history]
    messages = []
    for number, text in enumerate(questions):
        content = text
        if number == 0 and image is not None:
            content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        if number < len(answers):
            messages.append({"role": "assistant", "content": answers[number]})
    return messages


def cases(family):
    """[(name, messages, english, expected ids, expected answer, prompt tokens or None)] of a family's fixture."""
    if family == "visualglm":
        return [(s["name"], conversation(fixture_path("visualglm", s["image"]) if s["image"] else None,
                                         s["history"], s["query"]), s["english"], s["generated_ids"], s["response"],
                 s["prompt_len"]) for s in load_json("visualglm", "reference.json")["samples"]]
    if family == "cogvlm":  # every turn of every sample, as test_run_infer_cogvlm.py sends them
        return [(f"{s['name']} turn {number}", conversation(fixture_path("cogvlm", s["image"]) if s["image"] else None,
                                                            t["history"], t["user_text"]), False, t["generated_ids"],
                 t["response"], len(t["input_ids"])) for s in load_json("cogvlm", "reference.json")["samples"]
                for number, t in enumerate(s["turns"])]
    return [(t.name, conversation(t.request.image, t.request.history, t.request.prompt), False, t.generated_ids,
             t.answer, None) for t in turns(family)]


def reference_max_tokens(family):
    """The number of new tokens the family's reference answers were generated with."""
    if family in ("minigpt4", "minigpt4qwen"):
        return new_tokens(family)
    reference = load_json(family, "reference.json")
    return reference["n_new_tokens"] if family == "visualglm" else reference["generation"]["max_new_tokens"]


@pytest.fixture(scope="module", params=FAMILIES)
def server(request, tmp_path_factory):
    """(family, base URL, log path, model id, max_tokens, cases): the family's converted fixture, served."""
    family = request.param
    output = request.getfixturevalue(f"converted_{family}")
    config = output / f"run_{family}.yaml"
    folder = tmp_path_factory.mktemp(f"server_{family}")
    with served(folder, "--config", config, "--max_batch_size", 4, "--batch_window_ms", 200,
                "--served_model_name", f"{family}-fixture", "--max_image_mb", 1, "--max_image_pixels", 300_000,
                *([] if family == "visualglm" else ["--quick_start"]),  # the batch tests run on VisualGLM
                env={"VISUAL_MLLM_API_KEY": API_KEY}) as (url, log_path):
        yield family, url, log_path, f"{family}-fixture", reference_max_tokens(family), cases(family)


@pytest.fixture(scope="module")
def exported_server(converted_visualglm, tmp_path_factory):
    """The server on the graphs export_lite_model.py writes for the converted VisualGLM fixture (batch 2, the
    context the longest sample needs, as test_run_infer_families.py exports them)."""
    import math

    folder = tmp_path_factory.mktemp("server_exported")
    config = converted_visualglm / "run_visualglm.yaml"
    samples = cases("visualglm")
    reference = load_json("visualglm", "reference.json")
    longest = max(s["prompt_len"] for s in reference["samples"])
    seq_length = 32 * math.ceil((longest + reference["n_new_tokens"]) / 32)
    export = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "export_lite_model.py"), "--mode", "export",
                             "--config", str(config), "--use_past", "True", "--seq_length", str(seq_length),
                             "--batch_size", "2", "--output_dir", str(folder / "graphs")], cwd=folder,
                            env=dict(os.environ, LOCAL_DEFAULT_PATH=str(folder / "log")), capture_output=True,
                            timeout=900, stdin=subprocess.DEVNULL)
    assert export.returncode == 0, export.stderr.decode(errors="replace")[-3000:]
    with served(folder, "--export_dir", folder / "graphs", "--batch_window_ms", 200) as (url, log_path):
        yield "visualglm", url, log_path, "graphs", reference["n_new_tokens"], samples


def test_exported_graphs_give_the_reference_tokens(exported_server):
    """--export_dir: every sample plain and streamed, then all of them at once (batches of the exported 2)."""
    samples = exported_server[5]
    for name, messages, english, ids, answer, _ in samples:
        for stream in (False, True):
            assert ask(exported_server, messages, english, stream)[:2] == (answer, ids), (name, stream)
    with concurrent.futures.ThreadPoolExecutor(len(samples)) as pool:
        results = list(pool.map(lambda case: ask(exported_server, case[1], case[2]), samples))
    assert [r[:2] for r in results] == [(case[4], case[3]) for case in samples]
    assert health(exported_server[1])["batches"]["largest_batch"] == 2


def client(url, key=API_KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)


def ask(server, messages, english, stream=False, template=None):
    """(answer text, token ids, usage, completion id) of one greedy request through the openai client."""
    _, url, _, model, max_tokens, _ = server
    named = {} if template is None else {"template": template}
    kwargs = dict(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                  extra_body={"english": english, "return_token_ids": True, **named})
    if not stream:
        response = client(url).chat.completions.create(**kwargs)
        choice = response.choices[0]
        return choice.message.content, choice.model_extra["token_ids"], response.usage, response.id
    text, ids, usage, ids_seen = "", None, None, set()
    for chunk in client(url).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        ids_seen.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason is not None:
                ids = choice.model_extra["token_ids"]
    assert len(ids_seen) == 1, ids_seen  # every chunk of one completion carries its id
    return text, ids, usage, ids_seen.pop()


def health(url):
    return httpx.get(f"{url}/health", timeout=10).json()


def test_models_and_health(server):
    _, url, _, model, _, _ = server
    assert [m.id for m in client(url).models.list().data] == [model]
    assert health(url)["status"] == "ready"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_every_sample_gives_the_reference_tokens(server, stream):
    for name, messages, english, ids, answer, prompt_tokens in server[5]:
        text, got_ids, usage, _ = ask(server, messages, english, stream)
        assert got_ids == ids, name
        assert text == answer, name
        assert usage.completion_tokens == len(ids), name
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if prompt_tokens is not None:
            assert usage.prompt_tokens == prompt_tokens, name


@ON_VISUALGLM
def test_parallel_clients_share_batches(server):
    """Four requests of the samples, all at once: each answer is the one it gets alone; batches of several ran; every
    request is answered once (distinct ids, the completed count grows by exactly the number sent)."""
    _, url, log_path, _, _, samples = server
    jobs = (samples * 2)[:4]  # one batch of --max_batch_size when they arrive within the batch window
    before = health(url)["batches"]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda case: ask(server, case[1], case[2]), jobs))
    assert [result[:2] for result in results] == [(case[4], case[3]) for case in jobs]
    assert len({result[3] for result in results}) == len(jobs)
    after = health(url)["batches"]
    assert after["completed"] - before["completed"] == len(jobs)
    assert after["largest_batch"] > 1, after
    log = log_path.read_text(errors="replace")
    assert "request(s) in a batch of" in log


@ON_COGVLM
def test_a_request_names_its_prompt_template(server):
    """"template": "vqa" asks "Question: {q} Short answer:", the prompt the "base" template (the query as it
    is) makes of that text: both give the same prompt tokens and answer, streamed and not, and not the chat
    template's (a template ignored would fail both); a template the family lacks is a 400 in OpenAI's error
    shape, and the next request is answered."""
    _, url, _, model, _, samples = server
    _, messages, _, chat_ids, chat_answer, _ = samples[0]  # an image sample, no history
    question = messages[0]["content"][1]["text"]
    spelled_out = [{"role": "user", "content": [messages[0]["content"][0],
                                                 {"type": "text", "text": f"Question: {question} Short answer:"}]}]
    for stream in (False, True):
        vqa = ask(server, messages, False, stream, template="vqa")
        base = ask(server, spelled_out, False, stream, template="base")
        assert vqa[:2] == base[:2] and vqa[2].prompt_tokens == base[2].prompt_tokens, stream
        assert vqa[1] != chat_ids, stream
    response = post(url, {"model": model, "messages": messages, "template": "poem"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "template", "invalid_template")
    assert "'poem'" in error["message"] and "chat, vqa, base" in error["message"], error
    assert ask(server, messages, False)[:2] == (chat_answer, chat_ids)


@ON_VISUALGLM
def test_stop_text_cuts_the_answer(server):
    """`stop`: the answer ends before the first stop text, streamed and not, with finish_reason stop."""
    _, url, _, model, max_tokens, samples = server
    _, messages, english, _, answer, _ = samples[0]
    position = next(i for i in range(len(answer) // 2, len(answer)) if answer[i].isalnum())
    stop = answer[position]
    expected = answer[:answer.find(stop)]
    kwargs = dict(model=model, messages=messages, temperature=0, max_tokens=max_tokens, stop=[stop, "never seen"],
                  extra_body={"english": english})
    plain = client(url).chat.completions.create(**kwargs).choices[0]
    assert (plain.message.content, plain.finish_reason) == (expected, "stop")
    chunks = list(client(url).chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ bad input

def post(url, body, key=API_KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}/v1/chat/completions", content=raw if raw is not None else json.dumps(body),
                      headers=headers, timeout=120)


def png_bytes(width, height, noise=False):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8) if noise else \
        np.zeros((height, width, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "hi"}]}]


def png_url(data):
    return "data:image/png;base64," + base64.b64encode(data).decode()


BAD = {  # name -> (request body or raw bytes, API key, status, code, words the message must hold)
    "malformed_json": (b'{"model": ', API_KEY, 400, "invalid_json", "not valid JSON"),
    "wrong_schema": ({"model": "M", "messages": "hi"}, API_KEY, 400, "invalid_request", "messages"),
    "unknown_model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, API_KEY, 404,
                      "model_not_found", "gpt-4o"),
    "not_an_image_data_url": ({"model": "M", "messages": image_message("data:text/plain;base64,aGVsbG8=")}, API_KEY,
                              400, None, "text/plain"),
    "image_type_but_not_an_image": ({"model": "M", "messages": image_message(png_url(b"not a png"))}, API_KEY, 400,
                                    None, "not an image"),
    "oversize_image": ({"model": "M", "messages": image_message(png_url(png_bytes(800, 800, noise=True)))}, API_KEY,
                       413, "payload_too_large", "bytes"),
    "too_many_pixels": ({"model": "M", "messages": image_message(png_url(png_bytes(1000, 1000)))}, API_KEY, 413,
                        "payload_too_large", "pixels"),
    "second_image": ({"model": "M", "messages": image_message(png_url(png_bytes(8, 8))) + [
        {"role": "assistant", "content": "ok"}] + image_message(png_url(png_bytes(8, 8)))}, API_KEY, 400, None,
        "one image per conversation"),
    "over_long_prompt": ({"model": "M", "messages": [{"role": "user", "content": "长 " * 2000}]}, API_KEY, 400,
                         "context_length_exceeded", "tokens"),
    "template_the_family_lacks": ({"model": "M", "template": "vqa", "messages": [{"role": "user", "content": "hi"}]},
                                  API_KEY, 400, "invalid_template", "'vqa'"),
    "n_2": ({"model": "M", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, API_KEY, 400, None, "n=1"),
    "missing_api_key": ({"model": "M", "messages": [{"role": "user", "content": "hi"}]}, None, 401,
                        "missing_api_key", "API key"),
    "invalid_api_key": ({"model": "M", "messages": [{"role": "user", "content": "hi"}]}, "wrong", 401,
                        "invalid_api_key", "invalid API key"),
}


@ON_VISUALGLM
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_error_and_the_server_goes_on(server, name):
    _, url, _, model, _, samples = server
    body, key, status, code, words = BAD[name]
    raw = body if isinstance(body, bytes) else None
    if raw is None and body.get("model") == "M":
        body = dict(body, model=model)
    response = post(url, body, key, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    if name == "over_long_prompt":
        assert "over by" in error["message"]
    _, messages, english, ids, answer, _ = samples[-1]
    assert ask(server, messages, english)[:2] == (answer, ids)  # the next request is answered


@ON_VISUALGLM
def test_disconnect_mid_stream_frees_the_row(server):
    _, url, _, model, _, samples = server
    _, messages, english, ids, answer, _ = samples[0]
    before = health(url)["batches"]["cancelled"]
    body = {"model": model, "messages": messages, "stream": True, "temperature": 0, "max_tokens": 16}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ") and '"role": "assistant"' in first
    deadline = time.monotonic() + 30
    while health(url)["batches"]["cancelled"] == before:
        assert time.monotonic() < deadline, "the server did not notice the client went away"
        time.sleep(0.2)
    assert ask(server, messages, english)[:2] == (answer, ids)
