"""ChatGLM-6B (GLM v1), the LLM of VisualGLM-6B.

Numerics follow the released code (see ../shared/spec/architecture.md and the fixture quirks):
DeepNorm post-LN residual `h = LN_in(x); x = h*alpha + attn(h); m = LN_post(x); out = m*alpha + mlp(m)`
with alpha = sqrt(2 * num_layers) of the configured depth; 2-D rotary (each head's dims split in two
halves, positions row 0 on the first, row 1 on the second); tanh-GELU MLP; fused `query_key_value` whose
rows are [Q (all heads); K; V] (SAT order); untied lm_head without bias.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..layers import MLP, Embedding, LayerNorm, Linear, attention, merge_heads, split_heads
from .base import Decoder, LLMConfig, PositionScheme, attend_cache, rotate_half


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class GLMConfig(LLMConfig):
    """Sizes and special ids of a GLM v1 decoder (defaults: ChatGLM-6B).

    The fields use the LLMConfig names; the release's SAT / HF config.json names (`inner_hidden_size`,
    `layernorm_epsilon`, `max_sequence_length`) are translated by the converters, and are also accepted
    here as former names (YAMLs written before the rename).
    """

    model_type = "glm"
    former_keys = {"inner_hidden_size": "intermediate_size", "layernorm_epsilon": "norm_eps",
                   "max_sequence_length": "max_position_embeddings"}

    def __init__(self,
                 vocab_size=130528,          # rows of the embedding and lm_head (> tokenizer pieces in the release)
                 hidden_size=4096,
                 num_layers=28,              # also sets the DeepNorm alpha = sqrt(2 * num_layers)
                 num_heads=32,
                 intermediate_size=16384,    # MLP width (SAT default 4 * hidden)
                 norm_eps=1e-5,              # LayerNorm epsilon
                 max_position_embeddings=2048,  # longest prompt + answer the released model was trained for
                 rotary_base=10000.0,
                 bos_token_id=130004,        # <sop>: starts the answer; the prompt's last token
                 eos_token_id=130005,        # <eop>: ends the answer
                 pad_token_id=3,
                 mask_token_id=130000,       # [MASK]
                 gmask_token_id=130001,      # [gMASK]: its index becomes position row 0 of the answer
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rotary_base = rotary_base
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         **kwargs)


class GLMPositions(PositionScheme):
    """GLM's 2-D positions, found in the ids as the released code finds them.

    context_length = index of the first `<sop>` (the bidirectional prefix; the whole row if absent);
    the mask position = index of the first `[MASK]`, else of the first `[gMASK]`.
    Row 0: 0, 1, 2, ... over the context, then the mask position for `<sop>` and every answer token
    (counting on if the row has no mask token). Row 1: 0 over the context, then 1, 2, 3, ... from `<sop>`.
    """

    rows = 2

    def __init__(self, bos_token_id, mask_token_id, gmask_token_id):
        self.bos = bos_token_id
        self.mask = mask_token_id
        self.gmask = gmask_token_id

    @classmethod
    def from_config(cls, config):
        return cls(config.bos_token_id, config.mask_token_id, config.gmask_token_id)

    def _anchors(self, row):
        """(context_length, mask_position or None) of one prompt."""
        row = list(row)
        context = row.index(self.bos) if self.bos in row else len(row)
        mask = self.mask if self.mask in row else self.gmask
        return context, (row.index(mask) if mask in row else None)

    def prompt(self, rows, padded_length, token_types=None):
        pos = np.zeros((len(rows), 2, padded_length), np.int32)
        prefix = np.zeros((len(rows),), np.int32)
        for b, row in enumerate(rows):
            context, mask_position = self._anchors(row)
            n = len(row)
            pos[b, 0, :n] = np.arange(n)
            if mask_position is not None:
                pos[b, 0, context:n] = mask_position
            pos[b, 1, context:n] = np.arange(1, n - context + 1)
            prefix[b] = context
        return pos, prefix

    def step(self, rows, generated, token_types=None):
        pos = np.zeros((len(rows), 2, 1), np.int32)
        for b, row in enumerate(rows):
            context, mask_position = self._anchors(row)
            pos[b, 0, 0] = len(row) + generated if mask_position is None else mask_position
            pos[b, 1, 0] = len(row) - context + 1 + generated
        return pos


class GLMRotary(nn.Cell):
    """RoPE tables for each half of a head (dim head_dim/2 each, inverse frequencies kept in fp32)."""

    def __init__(self, head_dim, base):
        super().__init__()
        rot_dim = head_dim // 2
        inv_freq = 1.0 / (base ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))  # [rot_dim/2]

    def construct(self, position_ids):
        """position_ids [B,2,S] -> (cos, sin) each [B,2,1,S,rot_dim]."""
        freqs = position_ids.astype(ms.float32).expand_dims(-1) * self.inv_freq  # [B,2,S,rot_dim/2]
        emb = ops.concat((freqs, freqs), axis=-1).expand_dims(2)  # [B,2,1,S,rot_dim]
        return ops.cos(emb), ops.sin(emb)


def apply_2d_rotary(x, cos, sin):
    """x [B,h,S,d]: first half rotated with row 0, second half with row 1."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x1 = x1 * cos[:, 0] + rotate_half(x1) * sin[:, 0]
    x2 = x2 * cos[:, 1] + rotate_half(x2) * sin[:, 1]
    return ops.concat((x1, x2), axis=-1)


class GLMAttention(nn.Cell):
    def __init__(self, config, precision):
        super().__init__()
        self.num_heads = config.num_heads
        self.hidden_size = config.hidden_size
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size, precision=precision)
        self.dense = Linear(config.hidden_size, config.hidden_size, precision=precision)

    def construct(self, x, cos, sin, mask, cache_k, cache_v, valid_length, decode):
        qkv = self.query_key_value(x)  # [B,S,3H], rows [Q;K;V]
        q, k, v = ops.split(qkv, self.hidden_size, axis=-1)
        q = apply_2d_rotary(split_heads(q, self.num_heads), cos, sin)  # [B,h,S,d]
        k = apply_2d_rotary(split_heads(k, self.num_heads), cos, sin)
        v = split_heads(v, self.num_heads)
        k, v = attend_cache(k, v, cache_k, cache_v, valid_length, decode)
        out = attention(q, k, v, mask)  # [B,h,S,d]
        return self.dense(merge_heads(out))


class GLMBlock(nn.Cell):
    def __init__(self, config, precision):
        super().__init__()
        self.alpha = math.sqrt(2.0 * config.num_layers)
        self.input_layernorm = LayerNorm(config.hidden_size, config.norm_eps)
        self.attention = GLMAttention(config, precision)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, approximate="tanh", precision=precision)

    def construct(self, x, cos, sin, mask, cache_k, cache_v, valid_length, decode, route=None):
        h = self.input_layernorm(x)  # route: always None (GLM has no experts)
        x = h * self.alpha + self.attention(h, cos, sin, mask, cache_k, cache_v, valid_length, decode)
        m = self.post_attention_layernorm(x)
        return m * self.alpha + self.mlp(m)


class GLMModel(Decoder):
    """GLM v1 decoder with the LLM interface of `llm/base.py`."""

    def __init__(self, config):
        super().__init__(config)
        precision = self.precision
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, precision=precision)
        self.rotary = GLMRotary(config.head_dim, config.rotary_base)
        self.layers = nn.CellList([GLMBlock(config, precision) for _ in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, has_bias=False, precision=self.head_precision)

    @classmethod
    def position_scheme(cls, config):
        return GLMPositions.from_config(config)

    def cache_shape(self, batch, seq_length):
        return (batch, self.config.num_heads, seq_length, self.config.head_dim)

    def embed(self, input_ids):
        return self.word_embeddings(input_ids)  # [B,S,H]

    def final_norm(self, x):
        return self.final_layernorm(x)
