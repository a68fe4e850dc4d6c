"""The small interface every LLM decoder offers to the image side, generation, conversion and export.

A decoder (`glm.py`; `llama.py`, which also runs Qwen v1) is a `Decoder` Cell with:

* `embed(input_ids [B,S]) -> [B,S,H]` - the token embedding, so that image embeddings can be spliced in;
* `construct(inputs_embeds [B,S,H], position_ids [B,P,S], valid_length [B], prefix_length [B],
  caches=None, decode=False, token_types=None) -> hidden [B,S,H]`; `token_types` [B,S] int32 (1 = image
  row, 0 = text) is read only by decoders with `takes_token_types` (CogVLM's experts route by it);
* `logits(hidden [B,S,H]) -> [B,S,V]` - final norm already applied in construct; this is the lm_head;
* `positions` - a host-side `PositionScheme` that builds `position_ids` / `prefix_length` from token ids;
* `cache_shape(batch, seq_length)` - the shape of one layer's key (and value) cache.

Conventions shared by every family (and recorded in exported graphs' manifests):

* **Right padding.** Row b holds `valid_length[b]` real tokens at indices 0..valid_length[b]-1; the rest
  is padding that is masked out as keys. Rows of different lengths therefore give exactly the results
  they give alone.
* **Mask** (built inside the graph from two lengths, so graphs take no [S,S] input): query i may attend
  key j iff `j < valid_length[b]` and (`j < prefix_length[b]` or `j <= i`). `prefix_length` is the
  bidirectional prefix: GLM's context (everything before `<sop>`), 0 for purely causal decoders.
* **KV cache**: per layer a key and a value Parameter of `cache_shape(B, S_max)` =
  [B, kv_heads, S_max, head_dim]. Prefill (`decode=False`) writes the keys/values of its S positions at
  indices 0..S-1. A decode step (`decode=True`, S = 1) writes the new token at index `valid_length[b]`
  (the number of tokens already cached in that row) and attends keys 0..valid_length[b] (the graph
  computes scores over all S_max slots and masks the rest: cost grows with S_max, so size it to need).
* **Position ids** have P rows (GLM: 2 for its 2-D rotary, LLaMA/Qwen/CogVLM: 1). A scheme is given the
  rows' token types as well (CogVLM's positions depend on where the image is; the others ignore them).
"""
from dataclasses import replace

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..configuration import TowerConfig
from ..layers import Precision, numpy_dtype


class LLMConfig(TowerConfig):
    """What shared code (generation, export, finetune, the processor) reads of every decoder's config:
    vocab_size, hidden_size, num_layers, num_heads, head_dim, intermediate_size (the MLP width),
    norm_eps, max_position_embeddings (the longest prompt + answer the model was trained for) and the
    bos/eos/pad token ids. Every decoder's config uses these names, whatever its release calls them
    (GLM's `inner_hidden_size`, `layernorm_epsilon`, `max_sequence_length`): the converters translate."""

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


class PositionScheme:
    """Host-side (numpy) position ids for a family. Subclasses implement `prompt` and `step`.

    `token_types`: None (every token text) or per row a sequence of at least len(row) 0/1 types
    (1 = image row), as `generation.generator.token_types` builds them."""

    rows = 1

    def prompt(self, rows, padded_length, token_types=None):
        """rows: list of prompt id lists -> (position_ids int32 [B,P,padded_length], prefix_length int32 [B])."""
        raise NotImplementedError

    def step(self, rows, generated, token_types=None):
        """Positions [B,P,1] of the token at index len(prompt)+generated in each row."""
        raise NotImplementedError

    def extend(self, rows, prompt_positions, total_length, token_types=None):
        """Positions [B,P,total_length] for a prompt followed by generated tokens (the no-cache path)."""
        out = np.zeros((len(rows), self.rows, total_length), np.int32)
        for b, row in enumerate(rows):
            n = len(row)
            types = None if token_types is None else [token_types[b]]
            out[b, :, :n] = prompt_positions[b, :, :n]
            for k in range(total_length - n):
                out[b, :, n + k] = self.step([row], k, types)[0, :, 0]
        return out


def prefix_mask(seq_len, valid_length, prefix_length):
    """[B,1,S,S] float mask, 1 = may attend, following the module docstring's rule."""
    i = ops.arange(seq_len, dtype=ms.int32).reshape(1, seq_len, 1)  # query index
    j = ops.arange(seq_len, dtype=ms.int32).reshape(1, 1, seq_len)  # key index
    valid = j < valid_length.reshape(-1, 1, 1)  # [B,1,S]
    visible = ops.logical_or(j < prefix_length.reshape(-1, 1, 1), j <= i)  # [B,S,S]
    return ops.logical_and(valid, visible).astype(ms.float32).expand_dims(1)  # [B,1,S,S]


def decode_mask(cache_len, valid_length):
    """[B,1,1,S_max] mask of a decode step: keys 0..valid_length[b] (the new token included)."""
    j = ops.arange(cache_len, dtype=ms.int32).reshape(1, cache_len)
    return (j <= valid_length.reshape(-1, 1)).astype(ms.float32).reshape(-1, 1, 1, cache_len)


def write_cache(cache, new, valid_length, decode):
    """Store new keys/values [B,h,S,d] into a cache Parameter [B,h,S_max,d]; returns the updated cache.

    Prefill writes positions 0..S-1; a decode step writes only its one slot per row, at valid_length[b]
    (a scatter: the cost does not grow with S_max).
    """
    if decode:
        batch, heads = new.shape[0], new.shape[1]
        rows = ops.arange(batch, dtype=ms.int32).reshape(batch, 1).broadcast_to((batch, heads))
        cols = ops.arange(heads, dtype=ms.int32).reshape(1, heads).broadcast_to((batch, heads))
        slots = valid_length.astype(ms.int32).reshape(batch, 1).broadcast_to((batch, heads))
        index = ops.stack((rows, cols, slots), axis=-1)  # [B,h,3]
        return ops.scatter_nd_update(cache, index, new.squeeze(2).astype(cache.dtype))  # [B,h,S_max,d]
    pad = cache.shape[2] - new.shape[2]
    updated = ops.pad(new.astype(cache.dtype), (0, 0, 0, pad))  # [B,h,S_max,d]
    ops.assign(cache, updated)
    return updated


def attend_cache(k, v, cache_k, cache_v, valid_length, decode):
    """The keys/values [B,kv,S,d] one attention reads, after writing k, v [B,kv,S,d] to the layer's cache.

    Without a cache: k, v. Prefill: k, v (the writes kept in the graph). Decode: the whole cache
    [B,kv,S_max,d], whose unwritten slots the decode mask hides.
    """
    if cache_k is None:
        return k, v
    k_all = write_cache(cache_k, k, valid_length, decode)
    v_all = write_cache(cache_v, v, valid_length, decode)
    if decode:
        return k_all, v_all
    return ops.depend(k, k_all), ops.depend(v, v_all)


def rotate_half(x):
    """RoPE's rotate-half: [x1, x2] -> [-x2, x1] over the last axis."""
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), axis=-1)


class KVCache(nn.Cell):
    """Key and value Parameters for every layer of one decoder at one (batch, S_max)."""

    def __init__(self, num_layers, shape, dtype=ms.float32):
        super().__init__()
        self.shape = tuple(shape)
        zeros = np.zeros(self.shape, numpy_dtype(dtype))
        self.keys = ParameterTuple([Parameter(Tensor(zeros), name=f"kv_cache.key.{i}", requires_grad=False)
                                    for i in range(num_layers)])
        self.values = ParameterTuple([Parameter(Tensor(zeros), name=f"kv_cache.value.{i}", requires_grad=False)
                                      for i in range(num_layers)])


class Decoder(nn.Cell):
    """What every decoder's forward shares: rotary tables, the mask of `prefix_mask` / `decode_mask`, the
    layer loop with one cache slot per layer, the final norm and an untied `lm_head` computed to fp32.

    Subclasses build `rotary` (position_ids -> (cos, sin)), `layers` (blocks called as
    `block(x, cos, sin, mask, cache_k, cache_v, valid_length, decode, route)`) and `lm_head`, and implement
    `embed`, `final_norm`, `cache_shape` and the classmethod `position_scheme(config)`. `route` is what
    `route(token_types, decode)` makes of the token types: None here (every token through the same
    weights); a decoder with experts overrides it and sets `takes_token_types`.
    """

    takes_token_types = False  # whether callers must pass token_types (generation, export, training)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_layers = config.num_layers
        self.positions = type(self).position_scheme(config)
        self.precision = Precision.of(config)  # the KV cache is kept in its compute dtype
        # lm_head is never quantised: the logits decide every token, and it is one layer of many
        self.head_precision = replace(self.precision, quantize=None)

    @classmethod
    def position_scheme(cls, config):
        """The host-side PositionScheme of this decoder for `config`."""
        raise NotImplementedError

    def final_norm(self, x):
        raise NotImplementedError

    def route(self, token_types, decode):
        """The per-token expert choice the blocks receive; None: no experts."""
        return None

    def construct(self, inputs_embeds, position_ids, valid_length, prefix_length, caches=None, decode=False,
                  token_types=None):
        """Final-normed hidden states [B,S,H]; `caches` = (keys, values) Parameter tuples or None."""
        route = self.route(token_types, decode)
        cos, sin = self.rotary(position_ids)
        if decode:
            mask = decode_mask(caches[0][0].shape[2], valid_length)  # [B,1,1,S_max]
        else:
            mask = prefix_mask(inputs_embeds.shape[1], valid_length, prefix_length)  # [B,1,S,S]
        x = inputs_embeds
        for i in range(self.num_layers):
            if caches is None:
                x = self.layers[i](x, cos, sin, mask, None, None, valid_length, decode, route)
            else:
                x = self.layers[i](x, cos, sin, mask, caches[0][i], caches[1][i], valid_length, decode, route)
        return self.final_norm(x)

    def new_cache(self, batch, seq_length):
        """An empty KVCache for `batch` rows of up to `seq_length` tokens, in the compute dtype."""
        return KVCache(self.num_layers, self.cache_shape(batch, seq_length), self.precision.compute)

    def logits(self, hidden):
        return self.lm_head(hidden).astype(ms.float32)  # [B,S,V]

