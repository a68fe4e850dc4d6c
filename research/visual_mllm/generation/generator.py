"""The generation loop: family-neutral, the same for eager models and exported graphs.

Rows of a batch are right-padded (see `llm/base.py`), so a batch gives the tokens each row gives
alone. With the KV cache: one prefill call, then one decode call per token. Without it: the whole
sequence (prompt + answer so far, padded to a fixed length) is run again for every token, through the
same prefill graph, so both paths compile one shape per batch.

The loop talks to an *engine* (`EagerEngine` here; the exported-graph runtime in `export/runtime.py`):
    engine.positions, engine.seq_length, engine.pad_token_id, engine.use_past
    engine.padded_length(longest_prompt, max_new_tokens) -> S      (the sequence length to pad to)
    engine.start(batch, length)            (before each generate call; length = longest prompt + max_new_tokens)
    engine.embed(ids [B,S], image_embeds [B,Q,H] or None, image_start [B]) -> inputs_embeds
    engine.prefill(inputs_embeds, position_ids, valid_length, prefix_length, token_types) -> logits numpy [B,V]
    engine.decode(ids [B,1], position_ids [B,P,1], valid_length) -> logits numpy [B,V]
Token types ([B,S] int32, 1 on each row's image rows, `token_types`) go to the position scheme and to the
prefill; engines pass them to the graph only for decoders that take them (CogVLM's experts).
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from .sampling import GenerationConfig, TokenChooser
from .steps import PREFILL_MODES, DecodeStep, EmbedStep, PrefillStep, execution_mode

BUCKET = 16  # prompt lengths are padded up to a multiple of this, so few distinct graphs are compiled
# The smallest KV cache (slots): caches grow by powers of two from here up to seq_length, as requests need
MIN_CACHE = 128
NO_IMAGE = -(1 << 20)  # image_start of rows without an image


class ContextOverflowError(ValueError):
    """A prompt plus the requested answer does not fit the model's context."""


@dataclass
class PromptRow:
    ids: List[int]                     # prompt token ids, placeholders included
    image_start: Optional[int] = None  # index of the first image placeholder, None for text-only


def round_up(n, k):
    return -(-n // k) * k


def token_types(rows, length, num_image_tokens):
    """[B,length] int32: 1 on the `num_image_tokens` image rows of each row with an image, else 0."""
    types = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        if row.image_start is not None:
            types[b, row.image_start:row.image_start + num_image_tokens] = 1
    return types


def image_starts(rows):
    return np.array([NO_IMAGE if r.image_start is None else r.image_start for r in rows], np.int32)


class EagerEngine:
    """Graph-mode cells around a live decoder; compiled graphs and caches are kept per batch size.

    A batch size's KV cache holds the next power of two (from MIN_CACHE, at most seq_length) of the slots its
    longest request so far needed, and every shorter request reuses it: a 70-token answer does not pay memory
    and per-token attention for 2048 slots, and a session compiles at most log2(seq_length / MIN_CACHE) + 1
    decode graphs per batch size (a larger cache replaces the smaller one)."""

    def __init__(self, llm, seq_length, pad_token_id, use_past=True, prefill_mode="graph"):
        self.llm = llm
        self.positions = llm.positions
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.use_past = use_past
        self.prefill_mode = PREFILL_MODES[prefill_mode]  # embed and prefill run so; decode is compiled
        self.embed_step = EmbedStep(llm)
        self._steps = {}
        self._prefill = self._decode = None

    def padded_length(self, longest, max_new_tokens):
        return min(round_up(longest + (0 if self.use_past else max_new_tokens), BUCKET), self.seq_length)

    def cache_length(self, length):
        return min(self.seq_length, max(MIN_CACHE, 1 << (int(length) - 1).bit_length()))

    def cache_slots(self, batch):
        """Slots of the KV cache held for `batch` rows (0: none yet, or no cache)."""
        return self._steps[batch][0] if batch in self._steps else 0

    def start(self, batch, length):
        slots = self.cache_length(length) if self.use_past else 0
        if batch not in self._steps or self.cache_slots(batch) < slots:
            if self.use_past:
                cache = self.llm.new_cache(batch, slots)
                self._steps[batch] = (slots, PrefillStep(self.llm, cache), DecodeStep(self.llm, cache))
            else:
                self._steps[batch] = (slots, PrefillStep(self.llm), None)
        _, self._prefill, self._decode = self._steps[batch]

    def embed(self, ids, image_embeds, starts):
        if image_embeds is None:
            image_embeds = np.zeros((ids.shape[0], 1, self.llm.config.hidden_size), np.float32)
        with execution_mode(self.prefill_mode):
            return self.embed_step(Tensor(ids), Tensor(image_embeds, ms.float32), Tensor(starts))

    def prefill(self, inputs_embeds, position_ids, valid_length, prefix_length, types):
        extra = (Tensor(types),) if self.llm.takes_token_types else ()
        with execution_mode(self.prefill_mode):
            return self._prefill(inputs_embeds, Tensor(position_ids), Tensor(valid_length),
                                 Tensor(prefix_length), *extra).asnumpy()

    def decode(self, ids, position_ids, valid_length):
        return self._decode(Tensor(ids), Tensor(position_ids), Tensor(valid_length)).asnumpy()


def check_fits(rows, max_new_tokens, seq_length):
    longest = max(len(r.ids) for r in rows)
    over = longest + max_new_tokens - seq_length
    if over > 0:
        raise ContextOverflowError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context "
            f"seq_length {seq_length} by {over} tokens")


def generate(engine, rows: List[PromptRow], config: GenerationConfig, image_embeds=None, streamer=None,
             cancelled=None):
    """Token ids generated for each row (the end token excluded; a stop sequence that ended a row included).

    image_embeds: numpy [B,Q,H] for the rows' placeholders (rows without an image ignore theirs).
    streamer: object with put(token_ids [B]) and end(), called as tokens are chosen (-1: row finished).
    cancelled: callable() -> indices of rows to finish now (a server's client that went away, a per-row
        token limit or stop text), asked after every step: those rows get no further token, and the
        loop ends as soon as every row is finished.
    """
    check_fits(rows, config.max_new_tokens, engine.seq_length)
    batch = len(rows)
    prompts = [r.ids for r in rows]
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = engine.padded_length(int(lengths.max()), config.max_new_tokens)
    ids = np.full((batch, padded), engine.pad_token_id, np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    types = token_types(rows, padded, 0 if image_embeds is None else image_embeds.shape[1])
    positions, prefix = engine.positions.prompt(prompts, padded, types)
    if not engine.use_past:
        positions = engine.positions.extend(prompts, positions, padded, types)
    starts = image_starts(rows)
    engine.start(batch, int(lengths.max()) + config.max_new_tokens)
    chooser = TokenChooser(config)
    stops = [list(map(int, seq)) for seq in config.stop_sequences if len(seq)]
    seen = [list(p) for p in prompts]
    outputs = [[] for _ in rows]
    done = np.zeros(batch, bool)
    valid = lengths.copy()

    logits = engine.prefill(engine.embed(ids, image_embeds, starts), positions, valid, prefix, types)
    for step in range(config.max_new_tokens):
        tokens = chooser(logits, seen)
        emitted = np.full(batch, -1, np.int64)  # what each row received this step (-1: nothing)
        for b in np.nonzero(~done)[0]:
            if tokens[b] == config.eos_token_id:
                done[b] = True
            else:
                emitted[b] = tokens[b]
                outputs[b].append(int(tokens[b]))
                seen[b].append(int(tokens[b]))
                done[b] = any(outputs[b][-len(stop):] == stop for stop in stops)
        if streamer is not None:
            streamer.put(emitted)
        if cancelled is not None:
            done[list(cancelled())] = True
        if done.all() or step == config.max_new_tokens - 1:
            break
        feed = np.where(done, engine.pad_token_id, tokens).astype(np.int32)
        if engine.use_past:
            logits = engine.decode(feed.reshape(batch, 1), engine.positions.step(prompts, step, types), valid)
        else:
            ids[np.arange(batch), valid] = feed
            logits = engine.prefill(engine.embed(ids, image_embeds, starts), positions, valid + 1, prefix, types)
        valid = valid + 1
    if streamer is not None:
        streamer.end()
    return outputs
