"""The served model: loaded and warmed up in the background, and the requests' way into the batcher.

`Service.make_job` turns a validated chat completion request into a batcher Job: the messages into the
family's ChatRequest (serve/messages.py), the sampling fields into a GenerationConfig with the family's
reference demo settings as defaults (temperature 0 = greedy), and the prompt into token ids (the family's
history budget; a prompt that cannot fit is a 400 that gives the token counts).
"""
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from PIL import Image

from ..families import family_of
from ..generation.generator import EagerEngine
from ..generation.sampling import demo_generation_config
from ..inference import ChatRequest, generate_batch, prepare, prepare_batch
from ..processing.prompt import PromptTooLongError
from .batcher import Batcher, Job, bucket
from .errors import APIError, bad_request
from .messages import ImageLimits, to_chat_request

log = logging.getLogger("visual_mllm.serve")


@dataclass
class ServerOptions:
    model_id: str
    max_batch_size: int = 4
    max_queue: int = 64                 # requests waiting for the model; more get 429
    batch_window_ms: float = 10.0       # how long the worker waits for requests to join a batch
    default_max_tokens: int = 64        # max_tokens of requests that give none
    max_request_bytes: int = 20 << 20   # request body (413 above)
    images: ImageLimits = field(default_factory=ImageLimits)
    api_key: Optional[str] = None       # None: no key needed
    warm_up_all: bool = True            # compile every batch size the batcher runs before /health says ready


class Service:
    """load() -> (model, processor), run in a background thread by start(); `ready` once warmed up."""

    def __init__(self, load: Callable, options: ServerOptions):
        self.load = load
        self.options = options
        self.state = "loading"
        self.model = self.processor = self.family = self.batcher = None
        self.created = int(time.time())

    @property
    def ready(self):
        return self.state == "ready"

    def start(self):
        threading.Thread(target=self._load, name="visual_mllm-load", daemon=True).start()

    def _load(self):
        try:
            start = time.perf_counter()
            self.model, self.processor = self.load()
            self.family = family_of(self.model.config)
            log.info("model %s (%s) loaded in %.1f s; warming up", self.options.model_id, self.family.name,
                     time.perf_counter() - start)
            self.warm_up()
            self.batcher = Batcher(self.model, self.processor, self.options.max_batch_size, self.options.max_queue,
                                   self.options.batch_window_ms / 1e3)
            self.state = "ready"
            log.info("ready after %.1f s: serving %s", time.perf_counter() - start, self.options.model_id)
        except Exception as err:  # pylint: disable=broad-except  (reported by /health and the log)
            log.exception("loading the model failed")
            self.state = f"failed: {err}"

    def warm_up(self):
        """Compile the graphs of the batch sizes the batcher runs (see batcher.bucket; only one row without
        warm_up_all, or on exported graphs, which pad every batch to theirs), with an image."""
        image = Image.new("RGB", (64, 64))  # resized to the model's image size like any other
        config = demo_generation_config({}, 2, self.model.config.llm_config.eos_token_id)
        sizes = sorted({bucket(n, self.options.max_batch_size) for n in range(1, self.options.max_batch_size + 1)})
        if not self.options.warm_up_all or not isinstance(self.model.engine(), EagerEngine):
            sizes = [1]
        for size in sizes:
            batch = prepare_batch(self.model, self.processor, [ChatRequest("hello", image)] * size,
                                  config.max_new_tokens)
            generate_batch(self.model, self.processor, batch, config)
            log.info("warmed up: batches of %d row(s)", size)

    def check_ready(self):
        if self.state.startswith("failed"):
            raise APIError(503, f"the model could not be loaded ({self.state[8:]})", code="model_not_loaded")
        if not self.ready:
            raise APIError(503, "the model is still loading; retry when GET /health says ready",
                           code="model_loading", headers={"Retry-After": "2"})

    def check_model(self, name):
        if name != self.options.model_id:
            raise APIError(404, f"the model {name!r} does not exist on this server; it serves "
                                f"{self.options.model_id!r}", "model", "model_not_found")

    def generation_config(self, body, max_tokens):
        temperature = body.temperature
        do_sample = None if temperature is None else temperature > 0
        sampled = do_sample is not False
        try:
            return demo_generation_config(self.family.sampling, max_tokens, self.model.config.llm_config.eos_token_id,
                                          do_sample, body.seed, temperature=temperature if sampled else None,
                                          top_p=body.top_p if sampled else None)
        except ValueError as err:
            raise bad_request(str(err)) from err

    def make_job(self, body, on_event):
        """A Job for a validated request body (api.ChatCompletionRequest); APIError for what cannot be run."""
        job_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.n != 1:
            raise bad_request("only n=1 is supported", "n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or not all(stops):
            raise bad_request("stop takes up to 4 non-empty strings", "stop")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.options.default_max_tokens
        try:
            self.processor.prompt_builder.check_template(body.template)
        except ValueError as err:
            raise bad_request(f"{err} (model {self.options.model_id!r}, family {self.family.name})", "template",
                              "invalid_template") from err
        request = to_chat_request([m.model_dump() for m in body.messages], self.options.images, body.english,
                                  body.template, origin=job_id)
        config = self.generation_config(body, max_tokens)
        try:
            row, pixels, kept = prepare(self.model, self.processor, request, max_tokens)
        except ValueError as err:
            cause = err.__cause__ if isinstance(err.__cause__, PromptTooLongError) else err
            if isinstance(cause, PromptTooLongError):
                raise APIError(400, f"the prompt needs {cause.needed} tokens, but with max_tokens {max_tokens} "
                                    f"only {cause.budget} fit the model's context of {self.model.config.seq_length} "
                                    f"tokens (over by {cause.over_by})", "messages",
                               "context_length_exceeded") from err
            raise bad_request(str(err).split(": ", 1)[-1], "messages") from err
        return Job(job_id, request, row, pixels, kept, config, on_event, body.stream, stops)
