"""The graph cells that generation runs repeatedly and that export writes to MindIR.

They are family-neutral: they only use the LLM interface of `llm/base.py`.

* `EmbedStep`   input_ids [B,S], image_embeds [B,Q,H], image_start [B] -> inputs_embeds [B,S,H]
* `PrefillStep` inputs_embeds [B,S,H], position_ids [B,P,S], valid_length [B], prefix_length [B]
                (, token_types [B,S] for decoders that take them)
                -> logits [B,V] of each row's last valid token (writes the KV cache when it has one)
* `DecodeStep`  input_ids [B,1], position_ids [B,P,1], valid_length [B] -> logits [B,V]
                (valid_length = tokens already cached per row = the index the new token is written at)
"""
from contextlib import contextmanager

import mindspore as ms
from mindspore import nn, ops

# How the steps that run once per request (image encoding, embedding, the prompt's prefill) run; the decode
# step, run once per token, is always compiled. See VisionLanguageConfig.prefill_mode.
PREFILL_MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@contextmanager
def execution_mode(mode):
    """Run the block in MindSpore's `mode` (GRAPH_MODE / PYNATIVE_MODE), then restore the context's mode.
    Graphs compiled before stay compiled: switching costs nothing but the block's own execution."""
    before = ms.get_context("mode")
    if before == mode:  # the usual case (graph in graph mode): no context change on the per-call path
        yield
        return
    ms.set_context(mode=mode)
    try:
        yield
    finally:
        ms.set_context(mode=before)


def splice_image(text_embeds, image_embeds, image_start):
    """Replace rows image_start[b] .. image_start[b]+Q-1 of text_embeds by image_embeds[b].

    text_embeds [B,S,H], image_embeds [B,Q,H], image_start [B] (a negative start far below -Q, or a
    start past the sequence, leaves the row untouched: text-only rows in a mixed batch).
    """
    seq_len = text_embeds.shape[1]
    num_query = image_embeds.shape[1]
    offset = ops.arange(seq_len, dtype=ms.int32).reshape(1, seq_len) - image_start.reshape(-1, 1)  # [B,S]
    inside = ops.logical_and(offset >= 0, offset < num_query)  # [B,S]
    index = ops.clip(offset, 0, num_query - 1)  # [B,S]
    picked = ops.gather_elements(
        image_embeds, 1, index.expand_dims(-1).broadcast_to((-1, -1, image_embeds.shape[2])))  # [B,S,H]
    return ops.where(inside.expand_dims(-1), picked.astype(text_embeds.dtype), text_embeds)


class EmbedStep(nn.Cell):
    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def construct(self, input_ids, image_embeds, image_start):
        return splice_image(self.llm.embed(input_ids), image_embeds, image_start)


def last_valid(hidden, valid_length):
    """hidden [B,S,H] -> [B,1,H] at index valid_length[b]-1."""
    index = (valid_length - 1).reshape(-1, 1, 1).broadcast_to((-1, 1, hidden.shape[2]))
    return ops.gather_elements(hidden, 1, index)


class PrefillStep(nn.Cell):
    """The full-sequence forward. With `cache` it fills the KV cache; without it, it is the no-cache path."""

    def __init__(self, llm, cache=None):
        super().__init__()
        self.llm = llm
        self.cache = cache

    def construct(self, inputs_embeds, position_ids, valid_length, prefix_length, token_types=None):
        if self.cache is None:
            hidden = self.llm(inputs_embeds, position_ids, valid_length, prefix_length, None, False, token_types)
        else:
            hidden = self.llm(inputs_embeds, position_ids, valid_length, prefix_length,
                              (self.cache.keys, self.cache.values), False, token_types)
        return self.llm.logits(last_valid(hidden, valid_length)).squeeze(1)  # [B,V]


class DecodeStep(nn.Cell):
    def __init__(self, llm, cache):
        super().__init__()
        self.llm = llm
        self.cache = cache

    def construct(self, input_ids, position_ids, valid_length):
        embeds = self.llm.embed(input_ids)  # [B,1,H]
        hidden = self.llm(embeds, position_ids, valid_length, valid_length,
                          (self.cache.keys, self.cache.values), True)
        return self.llm.logits(hidden).squeeze(1)  # [B,V]
