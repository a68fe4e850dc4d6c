"""The server's pieces without a model: OpenAI messages -> the family's ChatRequest, image checks, the queue
limit (429), batch-size buckets. The HTTP server itself is tested in test_server.py."""
import base64
import io
import threading
import types

import numpy as np
import pytest

from visual_mllm.serve.batcher import Batcher, Job, bucket
from visual_mllm.serve.errors import APIError
from visual_mllm.serve.messages import ImageLimits, to_chat_request


def png_url(width=8, height=8, fmt="PNG", label=None):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buffer, format=fmt)
    return f"data:image/{label or fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def with_image(url, text="q1"):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def test_turns_become_history_and_the_image_is_the_conversations():
    messages = [with_image(png_url()), {"role": "assistant", "content": "a1"},
                {"role": "user", "content": [{"type": "text", "text": "q2"}]}]
    request = to_chat_request(messages, ImageLimits(), english=True, template="vqa", origin="r1")
    assert (request.prompt, request.history, request.english, request.template) == ("q2", [("q1", "a1")], True, "vqa")
    assert request.image.size == (8, 8) and request.image.mode == "RGB"
    assert to_chat_request([{"role": "user", "content": "hi"}], ImageLimits()).image is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_read(fmt):
    assert to_chat_request([with_image(png_url(fmt=fmt))], ImageLimits()).image.size == (8, 8)


@pytest.mark.parametrize("messages, status, words", [
    ([with_image(png_url(fmt="GIF"))], 400, "accepted: image/png"),
    ([with_image(png_url(fmt="GIF", label="png"))], 400, "a GIF image; PNG, JPEG and WebP"),
    ([with_image(png_url(64, 64))], 413, "pixels"),
    ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}], 400, "system"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], 400, "last message"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], 400, "alternates"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, with_image(png_url())], 400,
     "first user message"),
    ([with_image("/etc/passwd")], 400, "not allowed"),
    ([with_image("https://example.com/cat.png")], 400, "not enabled"),
])
def test_refused_messages(messages, status, words):
    with pytest.raises(APIError) as caught:
        to_chat_request(messages, ImageLimits(max_pixels=1000))
    assert caught.value.status == status and words in caught.value.message


def test_local_paths_only_inside_the_allowed_folder(tmp_path):
    from PIL import Image

    inside = tmp_path / "allowed" / "cat.png"
    inside.parent.mkdir()
    Image.new("RGB", (8, 8)).save(inside)
    limits = ImageLimits(local_dir=str(inside.parent))
    assert to_chat_request([with_image(str(inside))], limits).image.size == (8, 8)
    assert to_chat_request([with_image(f"file://{inside}")], limits).image.size == (8, 8)
    outside = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(outside)
    for path in (str(outside), str(inside.parent / ".." / "cat.png")):
        with pytest.raises(APIError, match="outside the folder"):
            to_chat_request([with_image(path)], limits)


def test_batch_sizes_are_powers_of_two_up_to_the_maximum():
    assert [bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]


def test_a_full_queue_is_429_with_retry_after():
    """max_queue 1 and a long batch window: the first job waits in the queue, the second is refused."""
    model = types.SimpleNamespace(config=types.SimpleNamespace(seq_length=128))
    batcher = Batcher(model, processor=None, max_batch_size=2, max_queue=1, batch_window_s=30)
    failed = threading.Event()

    def job(name):
        return Job(name, None, types.SimpleNamespace(ids=[1]), None, [], types.SimpleNamespace(max_new_tokens=4),
                   lambda kind, value: failed.set())

    first = job("a")
    batcher.submit(first)
    with pytest.raises(APIError) as caught:
        batcher.submit(job("b"))
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "1"}
    batcher.cancel(first)  # leaves the queue: the worker finds nothing to run
    assert not batcher.waiting and batcher.stats["cancelled"] == 1


def test_remote_images_only_when_enabled_within_the_size_limit(tmp_path):
    """A loopback HTTP server stands in for the web: refused by default, fetched when enabled, 413 when too big."""
    import functools
    import http.server

    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    (tmp_path / "big.png").write_bytes(base64.b64decode(png_url(64, 64).split(",")[1]) + b"\0" * 4096)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(APIError, match="not enabled"):
            to_chat_request([with_image(f"{base}/cat.png")], ImageLimits())
        limits = ImageLimits(max_bytes=2048, remote=True, remote_timeout_s=5)
        assert to_chat_request([with_image(f"{base}/cat.png")], limits).image.size == (8, 8)
        with pytest.raises(APIError) as caught:
            to_chat_request([with_image(f"{base}/big.png")], limits)
        assert caught.value.status == 413
        with pytest.raises(APIError, match="cannot fetch"):
            to_chat_request([with_image(f"{base}/missing.png")], limits)
    finally:
        httpd.shutdown()
