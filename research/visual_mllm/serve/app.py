"""The HTTP API (FastAPI): OpenAI's chat completions, the model list, health, and the web chat page.

    POST /v1/chat/completions   OpenAI's request and response schema; "stream": true answers with
                                server-sent events of chat.completion.chunk objects ending `data: [DONE]`
    GET  /v1/models             the served model
    GET  /health                200 {"status": "ready", ...batch statistics} once loaded and warmed up, else 503
    GET  /                      the web chat page (static/index.html, over the same API)

Extensions of the request (the openai client sends them with extra_body): "english" (the family's
English prompt format, VisualGLM's Q:/A:), "template" (one of the family's prompt templates, CogVLM's
chat / vqa / base; a name the family lacks is a 400), "return_token_ids" (each choice also carries
`token_ids`, the generated ids). Every error is OpenAI's error JSON; no traceback reaches a client (the log has it,
under the request's id).
"""
import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from .errors import APIError, bad_request, too_large

log = logging.getLogger("visual_mllm.serve")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")


class ImageURL(BaseModel):
    url: str
    detail: Optional[str] = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields without meaning here (user, metadata, ...)

    model: str
    messages: List[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    n: int = 1
    english: bool = False
    template: Optional[str] = None  # the family's prompt template (as run_infer.py's --template); None = its default
    return_token_ids: bool = False


def error_response(err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def schema_error(err: ValidationError):
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return bad_request(f"invalid request: {where}: {first['msg']}", where or None, "invalid_request")


def chunk(job_id, created, model_id, delta=None, finish_reason=None, **extra):
    choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason, **extra}
    return {"id": job_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [choice]}


def usage(completion):
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": len(completion.token_ids),
            "total_tokens": completion.prompt_tokens + len(completion.token_ids)}


def sse(data):
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(service):
    """The FastAPI app serving `service` (a serve.service.Service; started by the app's startup)."""
    options = service.options

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()  # in the background: /health says 503 until the model is loaded and warmed up
        yield

    app = FastAPI(title="visual_mllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_request, err):
        return error_response(err)

    @app.exception_handler(Exception)
    async def unexpected(request, err):  # a bug: the log has the traceback, the client one line
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error_response(APIError(500, f"internal error ({type(err).__name__}); see the server log"))

    @app.exception_handler(404)
    async def not_found(request, _err):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request, _err):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    def authorize(request):
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), options.api_key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    @app.get("/health")
    async def health():
        body = {"status": "ready" if service.ready else service.state, "model": options.model_id}
        if service.batcher is not None:
            body["batches"] = dict(service.batcher.stats, waiting=len(service.batcher.waiting))
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": options.model_id, "object": "model", "created": service.created,
                                            "owned_by": "visual_mllm"}]}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    async def read_body(request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > options.max_request_bytes:
            raise too_large(f"the request body is {declared} bytes, over the limit of {options.max_request_bytes}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > options.max_request_bytes:
                raise too_large(f"the request body is over the limit of {options.max_request_bytes} bytes")
        try:
            data = json.loads(bytes(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON ({err})", code="invalid_json") from err
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_request")
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as err:
            raise schema_error(err) from err

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await read_body(request)
        service.check_ready()
        service.check_model(body.model)
        loop = asyncio.get_running_loop()
        events = asyncio.Queue()

        def on_event(kind, value):  # from the batcher's thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = await run_in_threadpool(service.make_job, body, on_event)
        service.batcher.submit(job)
        log.info("%s: %s request, %d prompt tokens, %s", job.id, "streaming" if body.stream else "plain",
                 len(job.row.ids), "with an image" if job.pixels is not None else "text-only")
        created = int(time.time())
        if body.stream:
            return StreamingResponse(stream(job, events, body, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": job.id})
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
        except asyncio.CancelledError:
            service.batcher.cancel(job)
            raise
        choice = {"index": 0, "message": {"role": "assistant", "content": value.text}, "logprobs": None,
                  "finish_reason": value.finish_reason}
        if body.return_token_ids:
            choice["token_ids"] = value.token_ids
        return JSONResponse({"id": job.id, "object": "chat.completion", "created": created, "model": options.model_id,
                             "choices": [choice], "usage": usage(value)}, headers={"X-Request-Id": job.id})

    async def stream(job, events, body, created):
        finished = False
        try:
            yield sse(chunk(job.id, created, options.model_id, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield sse(chunk(job.id, created, options.model_id, {"content": value}))
                elif kind == "error":
                    yield sse(value.body())
                    break
                else:
                    extra = {"token_ids": value.token_ids} if body.return_token_ids else {}
                    yield sse(chunk(job.id, created, options.model_id, finish_reason=value.finish_reason, **extra))
                    if body.stream_options is not None and body.stream_options.include_usage:
                        last = chunk(job.id, created, options.model_id)
                        last.update(choices=[], usage=usage(value))
                        yield sse(last)
                    break
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away (the response was cancelled): free its row
                service.batcher.cancel(job)

    return app
