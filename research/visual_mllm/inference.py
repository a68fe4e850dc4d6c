"""Answering requests: prompt building, image encoding, batched generation and post-processing.

Family-neutral: it uses the model's `generate_ids` and the processor's prompt builder, image
processor and `decode_response`.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .generation.generator import PromptRow
from .generation.streamer import TextStreamer


@dataclass
class ChatRequest:
    prompt: str
    image: Optional[object] = None           # path, PIL image or array; None = text-only
    history: Sequence[Tuple[str, str]] = ()  # earlier (question, answer) turns
    english: bool = False


@dataclass
class ChatResult:
    response: str
    generated_ids: List[int]
    input_ids: List[int]
    history_used: List[Tuple[str, str]] = field(default_factory=list)  # turns kept to fit the context


def prepare(model, processor, request, max_new_tokens):
    """(PromptRow, pixel_values [3,H,W] or None, kept history) for one request.

    History turns are dropped oldest first until prompt + max_new_tokens fits seq_length; a query that
    cannot fit even alone raises PromptTooLongError saying by how much.
    """
    has_image = request.image is not None
    budget = model.config.seq_length - max_new_tokens
    kept, ids = processor.prompt_builder.fit_history(request.prompt, request.history, budget,
                                                     has_image=has_image, english=request.english)
    pixels = processor.image_processor(request.image)[0] if has_image else None
    return PromptRow(list(ids.input_ids), ids.image_start), pixels, kept


def answer(model, processor, requests, generation_config, stream=False, use_past=None):
    """ChatResults for a batch of ChatRequests (one generation batch; rows may differ in length)."""
    prepared = [prepare(model, processor, r, generation_config.max_new_tokens) for r in requests]
    rows = [p[0] for p in prepared]
    pixel_values = None
    if any(p[1] is not None for p in prepared):
        shape = next(p[1].shape for p in prepared if p[1] is not None)
        pixel_values = np.stack([np.zeros(shape, np.float32) if p[1] is None else p[1] for p in prepared])
    streamer = None
    if stream:
        first = requests[0]
        streamer = TextStreamer(
            lambda ids: processor.decode_response(rows[0].ids, ids, first.english))
    generated = model.generate_ids(rows, generation_config, pixel_values, streamer, use_past)
    return [ChatResult(processor.decode_response(row.ids, ids, req.english), ids, row.ids, kept)
            for row, ids, req, (_, _, kept) in zip(rows, generated, requests, prepared)]
