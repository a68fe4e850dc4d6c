"""The HTTP server (visual_mllm.serve) under load: requests/s, tokens/s and time to first token at 1, 4 and 8
concurrent clients, against the same requests answered one after another through the package's Python API
(`inference.answer`, what run_infer.py runs).

The model is chat_inference's mid-size VisualGLM (random weights; its tiny tokenizer), served in this
process by uvicorn on a loopback port with --max_batch_size 8; the clients are threads streaming with
httpx (time to first token = until the first answer text arrives). Every request carries an image and a
different question; greedy, at most `new_tokens` tokens (a row may end earlier at the end token, so
tokens/s counts the tokens really generated, from the responses' usage). The server compiles every batch
size while it warms up; each concurrency also runs its requests once untimed first, as the sequential
baseline does.
"""
import base64
import concurrent.futures
import io
import json
import socket
import threading
import time

import numpy as np

from ..common import Row, Section, Settings
from .chat_inference import FULL, QUICK, build_visualglm

TITLE = "Serving: requests/s, tokens/s, time to first token at 1/4/8 concurrent clients vs sequential Python API"
CONCURRENCY = (1, 4, 8)
MODEL_ID = "bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(size, seed):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bodies(count, size, new_tokens):
    """`count` requests: the same question about different images (one prompt length: the batch shapes the
    server compiled while warming up are the only ones used)."""
    return [{"model": MODEL_ID, "stream": True, "temperature": 0, "max_tokens": new_tokens,
             "stream_options": {"include_usage": True},
             "messages": [{"role": "user", "content": [
                 {"type": "image_url", "image_url": {"url": png_data_url(size, seed)}},
                 {"type": "text", "text": "描述这张图片。"}]}]}
            for seed in range(count)]


def stream_one(url, body):
    """(seconds to the first answer text, completion tokens) of one streamed request."""
    import httpx

    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if first is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return (time.perf_counter() - start if first is None else first), tokens


def load_round(url, requests, concurrency):
    """(wall seconds, [time to first token], total completion tokens) of `requests` sent by `concurrency` clients."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: stream_one(url, body), requests))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def start_server(model, processor):
    import uvicorn

    from visual_mllm.serve.app import create_app
    from visual_mllm.serve.service import ServerOptions, Service

    service = Service(lambda: (model, processor), ServerOptions(MODEL_ID, max_batch_size=max(CONCURRENCY)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not service.ready:
        if service.state.startswith("failed"):
            raise RuntimeError(service.state)
        time.sleep(0.2)
    return server, thread, f"http://127.0.0.1:{port}", service


def sequential(model, processor, requests):
    """(wall seconds, total tokens) of the requests answered one by one through inference.answer."""
    from visual_mllm.generation.sampling import GenerationConfig
    from visual_mllm.inference import answer
    from visual_mllm.serve.messages import ImageLimits, to_chat_request

    config = GenerationConfig(max_new_tokens=requests[0]["max_tokens"],
                              eos_token_id=model.config.llm_config.eos_token_id)
    chats = [to_chat_request(body["messages"], ImageLimits()) for body in requests]
    for chat in chats:  # untimed, as the server's rounds: compiles the shapes these requests use
        answer(model, processor, [chat], config)
    start = time.perf_counter()
    tokens = sum(len(answer(model, processor, [chat], config)[0].generated_ids) for chat in chats)
    return time.perf_counter() - start, tokens


def run(settings: Settings) -> Section:
    sizes = QUICK if settings.quick else FULL
    count = 4 if settings.quick else 16
    section = Section("serving")
    section.config.append(f"- serving: chat_inference's {'quick' if settings.quick else 'mid-size'} VisualGLM "
                          f"(LLM hidden {sizes.hidden_size}, {sizes.num_layers} layers); {count} requests per "
                          f"concurrency, the same question about {count} different {sizes.image_size} px images, greedy, at most "
                          f"{sizes.new_tokens} new tokens; server --max_batch_size {max(CONCURRENCY)}")
    model, processor = build_visualglm(sizes)
    requests = bodies(count, sizes.image_size, sizes.new_tokens)
    add = section.rows.append
    server, thread, url, service = start_server(model, processor)
    try:
        # after the server's warm-up (measured before it, the same calls ran ~2x slower here: the process
        # state both sides see must be the same), with the server idle
        seq_s, seq_tokens = sequential(model, processor, requests)
        add(Row("sequential Python API: requests/s", count / seq_s, "req/s", count, "inference.answer, one by one"))
        add(Row("sequential Python API: tokens/s", seq_tokens / seq_s, "tokens/s", count))
        for concurrency in CONCURRENCY:
            load_round(url, requests, concurrency)  # untimed: compiles this concurrency's batch shapes
            wall, firsts, tokens = load_round(url, requests, concurrency)
            add(Row(f"server, {concurrency} clients: requests/s", count / wall, "req/s", count))
            add(Row(f"server, {concurrency} clients: tokens/s", tokens / wall, "tokens/s", count,
                    f"{tokens} tokens"))
            add(Row(f"server, {concurrency} clients: time to first token p50", percentile(firsts, 50) * 1e3, "ms",
                    count, f"p95 {percentile(firsts, 95) * 1e3:.0f} ms", min(firsts) * 1e3))
            add(Row(f"server, {concurrency} clients: time to first token p95", percentile(firsts, 95) * 1e3, "ms",
                    count))
            stats = service.batcher.stats
            add(Row(f"server, {concurrency} clients / sequential: requests/s", seq_s / wall, "x",
                    notes=f"largest batch so far {stats['largest_batch']} ({stats['batches']} batches)"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return section
