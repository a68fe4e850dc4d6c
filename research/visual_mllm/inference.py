"""Answering requests: prompt building, image encoding, batched generation, timings and post-processing.

Family-neutral: it uses the model's `encode_images` and `generator`, and the processor's prompt
builder, image processor and `decode_response`. One batch goes through three steps, which both
`answer` (the generate mode) and the mindformers pipeline (`visual_mllm.pipeline`) run:

    prepare_batch -> generate_batch -> finish_batch
"""
import time
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .generation.generator import PromptRow, generate
from .generation.streamer import TextStreamer


class RequestError(ValueError):
    """A request cannot be answered (unreadable image, prompt too long); the message says which request."""


@dataclass
class ChatRequest:
    prompt: str
    image: Optional[object] = None           # path, PIL image or array; None = text-only
    history: Sequence[Tuple[str, str]] = ()  # earlier (question, answer) turns
    english: bool = False
    origin: Optional[str] = None             # where the request comes from (e.g. "in.jsonl line 3"), for errors
    template: Optional[str] = None           # a prompt template of the family (CogVLM: chat, vqa, base); None = its default


@dataclass
class Timings:
    """How long one batch took, seen from one of its rows (all times in milliseconds).

    first_token_ms counts from the moment the batch reaches the model (pixels preprocessed, prompts
    tokenised): image encoding + prefill + choosing the first token. The first batch of a shape also
    pays for compiling its graphs.
    """

    batch_size: int
    image_encode_ms: Optional[float]       # None when no row of the batch has an image
    first_token_ms: Optional[float]        # None when nothing was generated
    new_tokens: int                        # tokens this row generated (the end token excluded)
    decode_tokens_per_s: Optional[float]   # this row's tokens after the first / the time they took
    total_ms: float

    def as_dict(self, digits=2):
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class ChatResult:
    response: str
    generated_ids: List[int]
    input_ids: List[int]
    history_used: List[Tuple[str, str]] = field(default_factory=list)  # turns kept to fit the context
    timings: Optional[Timings] = None


@dataclass
class PreparedBatch:
    requests: List[ChatRequest]
    rows: List[PromptRow]
    pixel_values: Optional[np.ndarray]      # [B,3,H,W] (zeros for text-only rows), None if no row has an image
    kept_history: List[List[Tuple[str, str]]]


def fit_prompt(model, processor, request, max_new_tokens):
    """(kept history, PromptIds) of a request: its history cut, oldest turns first, to fit the context."""
    budget = model.config.seq_length - max_new_tokens
    return processor.prompt_builder.fit_history(request.prompt, request.history, budget,
                                                has_image=request.image is not None, english=request.english,
                                                template=request.template)


def prepare(model, processor, request, max_new_tokens):
    """(PromptRow, pixel_values [3,H,W] or None, kept history) for one request.

    History turns are dropped oldest first until prompt + max_new_tokens fits seq_length; a query that
    cannot fit even alone raises PromptTooLongError saying by how much. With `request.origin` set,
    errors are RequestErrors naming it.
    """
    try:
        kept, ids = fit_prompt(model, processor, request, max_new_tokens)
        pixels = processor.image_processor(request.image)[0] if request.image is not None else None
    except ValueError as err:
        if request.origin is None:
            raise
        raise RequestError(f"{request.origin}: {err}") from err
    return PromptRow(list(ids.input_ids), ids.image_start), pixels, kept


def prepare_batch(model, processor, requests, max_new_tokens) -> PreparedBatch:
    return assemble_batch(requests, [prepare(model, processor, r, max_new_tokens) for r in requests])


def assemble_batch(requests, prepared) -> PreparedBatch:
    """The batch of requests whose `prepare` results are `prepared` (e.g. prepared one by one as they came)."""
    pixel_values = None
    if any(p[1] is not None for p in prepared):
        shape = next(p[1].shape for p in prepared if p[1] is not None)
        pixel_values = np.stack([np.zeros(shape, np.float32) if p[1] is None else p[1] for p in prepared])
    return PreparedBatch(list(requests), [p[0] for p in prepared], pixel_values, [p[2] for p in prepared])


def graph_shapes(model, processor, requests, generation_config, batch_size, use_past=None):
    """What decides the graphs that answering `requests` in batches of `batch_size` compiles, in order: per
    batch (rows, with an image or not, padded prompt length, KV cache slots). Requests with other words but
    these shapes compile the same graphs. Only the prompts are tokenised (no image is read)."""
    engine = model.engine(use_past)
    new_tokens = generation_config.max_new_tokens
    shapes = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        longest = max(len(fit_prompt(model, processor, r, new_tokens)[1].input_ids) for r in chunk)
        shapes.append((len(chunk), any(r.image is not None for r in chunk), engine.padded_length(longest, new_tokens),
                       engine.cache_length(longest + new_tokens) if engine.use_past else 0))
    return shapes


class StepClock:
    """A streamer hook (put/end, see generation/streamer.py) noting when each row received its tokens;
    it passes every call on to `inner` (e.g. a TextStreamer)."""

    def __init__(self, batch_size, start, inner=None):
        self.start = start
        self.inner = inner
        self.first = None
        self.counts = np.zeros(batch_size, np.int64)
        self.last = [None] * batch_size
        self.stop = None

    def put(self, tokens):
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        for b in np.nonzero(np.asarray(tokens) >= 0)[0]:
            self.counts[b] += 1
            self.last[b] = now
        if self.inner is not None:
            self.inner.put(tokens)

    def end(self):
        self.stop = time.perf_counter()
        if self.inner is not None:
            self.inner.end()

    def timings(self, image_encode_s):
        """One Timings per row."""
        def ms(seconds):
            return None if seconds is None else seconds * 1e3

        first = None if self.first is None else self.first - self.start
        out = []
        for count, last in zip(self.counts, self.last):
            rate = None
            if count > 1 and last > self.first:
                rate = (int(count) - 1) / (last - self.first)
            out.append(Timings(len(self.counts), ms(image_encode_s), ms(first), int(count), rate,
                               ms(self.stop - self.start)))
        return out


def with_family_stops(processor, generation_config):
    """generation_config plus the family's stop sequences (its prompt builder's), never choosing ids the
    tokenizer cannot decode."""
    stops = [list(seq) for seq in processor.prompt_builder.stop_sequences()]
    return replace(generation_config, stop_sequences=[*map(list, generation_config.stop_sequences), *stops],
                   vocab_limit=len(processor.tokenizer))


def generate_batch(model, processor, batch: PreparedBatch, generation_config, stream=False, use_past=None,
                   listener=None, cancelled=None):
    """(generated ids per row, Timings per row). With `stream`, row 0's answer is printed as it grows.

    generation_config goes through `with_family_stops`. listener: a streamer hook (put/end, see
    generation/streamer.py) that sees every step's tokens, instead of `stream`; cancelled: rows to finish
    early (see generation.generator.generate).
    """
    generation_config = with_family_stops(processor, generation_config)
    streamer = listener
    if stream:
        first_row, first_request = batch.rows[0], batch.requests[0]
        streamer = TextStreamer(
            lambda ids: processor.decode_response(first_row.ids, ids, first_request.english),
            holdback=max((len(seq) for seq in generation_config.stop_sequences), default=1) - 1)
    start = time.perf_counter()
    image_embeds, encode_s = None, None
    if batch.pixel_values is not None:
        image_embeds = model.encode_images(batch.pixel_values)
        encode_s = time.perf_counter() - start
    clock = StepClock(len(batch.rows), start, streamer)
    generated = generate(model.engine(use_past), batch.rows, generation_config, image_embeds, clock, cancelled)
    return generated, clock.timings(encode_s)


def finish_batch(processor, batch: PreparedBatch, generated, timings) -> List[ChatResult]:
    return [ChatResult(processor.decode_response(row.ids, ids, req.english), ids, row.ids, kept, t)
            for row, ids, req, kept, t in zip(batch.rows, generated, batch.requests, batch.kept_history, timings)]


def answer(model, processor, requests, generation_config, stream=False, use_past=None):
    """ChatResults for a batch of ChatRequests (one generation batch; rows may differ in length)."""
    batch = prepare_batch(model, processor, requests, generation_config.max_new_tokens)
    generated, timings = generate_batch(model, processor, batch, generation_config, stream, use_past)
    return finish_batch(processor, batch, generated, timings)
