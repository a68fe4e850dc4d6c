"""The generation loop: family-neutral, graph mode for every repeated call, sampling on the host.

Rows of a batch are right-padded (see `llm/base.py`), so a batch gives the tokens each row gives
alone. With the KV cache: one prefill call, then one decode call per token. Without it: the whole
sequence (prompt + answer so far, padded to a fixed length) is run again for every token, through the
same prefill graph, so both paths share one compiled shape per batch.
"""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..llm.base import KVCache
from .sampling import GenerationConfig, TokenChooser
from .steps import DecodeStep, EmbedStep, PrefillStep

BUCKET = 16  # prompt lengths are padded up to a multiple of this, so few distinct graphs are compiled
NO_IMAGE = -(1 << 20)  # image_start of rows without an image


class ContextOverflowError(ValueError):
    """A prompt plus the requested answer does not fit the model's context."""


@dataclass
class PromptRow:
    ids: List[int]                     # prompt token ids, placeholders included
    image_start: Optional[int] = None  # index of the first image placeholder, None for text-only


def _round_up(n, k):
    return -(-n // k) * k


class Generator:
    """Runs generation for one decoder; compiled graphs and caches are kept per batch size."""

    def __init__(self, llm, seq_length, pad_token_id, use_past=True):
        self.llm = llm
        self.seq_length = seq_length
        self.pad_token_id = pad_token_id
        self.use_past = use_past
        self.embed_step = EmbedStep(llm)
        self._steps = {}

    def _graphs(self, batch):
        """(prefill, decode or None) for a batch size, built once."""
        if batch not in self._steps:
            if self.use_past:
                cache = KVCache(self.llm.num_layers, self.llm.cache_shape(batch, self.seq_length))
                self._steps[batch] = (PrefillStep(self.llm, cache), DecodeStep(self.llm, cache))
            else:
                self._steps[batch] = (PrefillStep(self.llm), None)
        return self._steps[batch]

    def check_fits(self, rows, max_new_tokens):
        longest = max(len(r.ids) for r in rows)
        over = longest + max_new_tokens - self.seq_length
        if over > 0:
            raise ContextOverflowError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context "
                f"seq_length {self.seq_length} by {over} tokens")

    def _embed(self, ids, rows, image_embeds, hidden):
        batch = len(rows)
        if image_embeds is None:
            image_embeds = np.zeros((batch, 1, hidden), np.float32)
        starts = np.array([NO_IMAGE if r.image_start is None else r.image_start for r in rows], np.int32)
        return self.embed_step(Tensor(ids), Tensor(image_embeds, ms.float32), Tensor(starts))

    def generate(self, rows: List[PromptRow], config: GenerationConfig, image_embeds=None, streamer=None):
        """Token ids generated for each row (the end token excluded).

        image_embeds: numpy [B,Q,H] for the rows' placeholders (rows without an image ignore theirs).
        streamer: object with put(token_ids [B]) and end(), called as tokens are chosen.
        """
        self.check_fits(rows, config.max_new_tokens)
        batch = len(rows)
        lengths = np.array([len(r.ids) for r in rows], np.int32)
        prefill, decode = self._graphs(batch)
        padded = min(_round_up(int(lengths.max()) + (0 if self.use_past else config.max_new_tokens), BUCKET),
                     self.seq_length)
        ids = np.full((batch, padded), self.pad_token_id, np.int32)
        for b, r in enumerate(rows):
            ids[b, :len(r.ids)] = r.ids
        positions, prefix = self.llm.positions.prompt([r.ids for r in rows], padded)
        if not self.use_past:
            positions = self.llm.positions.extend([r.ids for r in rows], positions, padded)
        hidden = self.llm.config.hidden_size
        chooser = TokenChooser(config)
        seen = [list(r.ids) for r in rows]
        outputs = [[] for _ in rows]
        done = np.zeros(batch, bool)
        valid = lengths.copy()

        logits = prefill(self._embed(ids, rows, image_embeds, hidden), Tensor(positions),
                         Tensor(valid), Tensor(prefix))
        for step in range(config.max_new_tokens):
            tokens = chooser(logits.asnumpy(), seen)
            for b in np.nonzero(~done)[0]:
                if tokens[b] == config.eos_token_id:
                    done[b] = True
                else:
                    outputs[b].append(int(tokens[b]))
                    seen[b].append(int(tokens[b]))
            if streamer is not None:
                streamer.put(np.where(done, -1, tokens))
            if done.all() or step == config.max_new_tokens - 1:
                break
            feed = np.where(done, self.pad_token_id, tokens).astype(np.int32)
            if self.use_past:
                step_pos = self.llm.positions.step([r.ids for r in rows], step)
                logits = decode(Tensor(feed.reshape(batch, 1)), Tensor(step_pos), Tensor(valid))
            else:
                ids[np.arange(batch), valid] = feed
                logits = prefill(self._embed(ids, rows, image_embeds, hidden), Tensor(positions),
                                 Tensor(valid + 1), Tensor(prefix))
            valid = valid + 1
        if streamer is not None:
            streamer.end()
        return outputs
