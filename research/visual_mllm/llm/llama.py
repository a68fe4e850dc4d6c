"""The LLaMA decoder (Vicuna, the LLM of MiniGPT-4), with the LLM interface of `llm/base.py`.

Standard LLaMA numerics: pre-RMSNorm blocks `x = x + attn(norm(x)); x = x + mlp(norm(x))`, rotary
position embedding over the whole head dim (rotate-half convention, `inv_freq = 1/base^(2i/d)` in fp32,
the layout of HF checkpoints, whose q/k rows are already permuted for it), causal attention scaled by
1/sqrt(head_dim), SwiGLU MLP, final RMSNorm, untied lm_head; no biases except an optional one on the
query/key/value projection (Qwen v1 has it: `llm/qwen.py` builds this decoder from its own config).
Grouped-query attention: `num_kv_heads` key/value heads, each shared by num_heads/num_kv_heads query
heads; the KV cache holds only those.

Weights are fused where that saves a matmul per layer: `qkv` = rows [Q (all heads); K; V] and
`mlp.gate_up` = rows [gate; up]; the converters concatenate the separate checkpoint matrices.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..layers import Embedding, Linear, RMSNorm, SwiGLU, attention, merge_heads, split_heads
from .base import Decoder, LLMConfig, PositionScheme, attend_cache, rotate_half


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class LlamaConfig(LLMConfig):
    """Sizes and special ids of a LLaMA decoder (defaults: LLaMA-7B / Vicuna-7B)."""

    model_type = "visual_mllm_llama"

    def __init__(self,
                 vocab_size=32000,
                 hidden_size=4096,
                 num_layers=32,
                 num_heads=32,
                 num_kv_heads=None,             # grouped-query attention; None = num_heads (LLaMA-1, Vicuna v0)
                 intermediate_size=11008,       # width of each SwiGLU branch
                 norm_eps=1e-6,                 # RMSNorm epsilon
                 rope_theta=10000.0,            # rotary base
                 max_position_embeddings=2048,  # longest prompt + answer the released model was trained for
                 qkv_bias=False,                # a bias on the q/k/v projection (LLaMA: none; Qwen v1: yes)
                 bos_token_id=1,
                 eos_token_id=2,
                 pad_token_id=0,                # LLaMA has no pad piece; only its position matters (masked)
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.qkv_bias = qkv_bias
        if hidden_size % num_heads or num_heads % self.num_kv_heads:
            raise ValueError(f"{type(self).__name__}: hidden_size {hidden_size} must divide into num_heads "
                             f"{num_heads}, and num_heads into num_kv_heads {self.num_kv_heads}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         **kwargs)


class CausalPositions(PositionScheme):
    """One row of positions 0, 1, 2, ... and no bidirectional prefix: a plain causal decoder."""

    rows = 1

    def prompt(self, rows, padded_length, token_types=None):
        pos = np.zeros((len(rows), 1, padded_length), np.int32)
        for b, row in enumerate(rows):
            pos[b, 0, :len(row)] = np.arange(len(row))
        return pos, np.zeros((len(rows),), np.int32)

    def step(self, rows, generated, token_types=None):
        return np.array([len(row) + generated for row in rows], np.int32).reshape(-1, 1, 1)


class Rotary(nn.Cell):
    """RoPE tables over the whole head dim (inverse frequencies in fp32)."""

    def __init__(self, head_dim, base):
        super().__init__()
        inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))  # [head_dim/2]

    def construct(self, position_ids):
        """position_ids [B,1,S] -> (cos, sin) each [B,1,S,head_dim], broadcast over heads."""
        freqs = position_ids.astype(ms.float32).expand_dims(-1) * self.inv_freq  # [B,1,S,d/2]
        emb = ops.concat((freqs, freqs), axis=-1)  # [B,1,S,d]
        return ops.cos(emb), ops.sin(emb)


def apply_rotary(x, cos, sin):
    """x [B,h,S,d] rotated in float32, returned in its own dtype."""
    x32 = x.astype(ms.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


class LlamaAttention(nn.Cell):
    def __init__(self, config, precision):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.repeats = config.num_heads // config.num_kv_heads
        head_dim = config.head_dim
        self.sizes = (config.num_heads * head_dim, config.num_kv_heads * head_dim, config.num_kv_heads * head_dim)
        self.qkv = self.make_linear(config.hidden_size, sum(self.sizes), config.qkv_bias, precision)
        self.o_proj = self.make_linear(config.num_heads * head_dim, config.hidden_size, False, precision)

    def make_linear(self, in_features, out_features, has_bias, precision):
        """One projection of the attention (a decoder with experts makes one per expert)."""
        return Linear(in_features, out_features, has_bias=has_bias, precision=precision)

    def project_qkv(self, x, route):
        """[B,S,H] -> fused [Q; K; V] [B,S,(h+2kv)*d] (`route`: the expert choice of decoders with experts)."""
        return self.qkv(x)

    def project_out(self, x, route):
        """[B,S,h*d] -> [B,S,H]"""
        return self.o_proj(x)

    def construct(self, x, cos, sin, mask, cache_k, cache_v, valid_length, decode, route=None):
        q, k, v = ops.split(self.project_qkv(x, route), self.sizes, axis=-1)  # [B,S,h*d], [B,S,kv*d] x 2
        q = apply_rotary(split_heads(q, self.num_heads), cos, sin)  # [B,h,S,d]
        k = apply_rotary(split_heads(k, self.num_kv_heads), cos, sin)  # [B,kv,S,d]
        v = split_heads(v, self.num_kv_heads)  # [B,kv,S,d]
        k, v = attend_cache(k, v, cache_k, cache_v, valid_length, decode)
        if self.repeats > 1:  # query head i reads key/value head i // repeats
            k = ops.repeat_interleave(k, self.repeats, axis=1)  # [B,h,Sk,d]
            v = ops.repeat_interleave(v, self.repeats, axis=1)
        return self.project_out(merge_heads(attention(q, k, v, mask)), route)  # [B,S,H]


class LlamaBlock(nn.Cell):
    attention_class = LlamaAttention

    def __init__(self, config, precision):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = self.attention_class(config, precision)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = self.build_mlp(config, precision)

    def build_mlp(self, config, precision):
        return SwiGLU(config.hidden_size, config.intermediate_size, precision)

    def feed_forward(self, x, route):
        """The MLP of [B,S,H] (`route`: the expert choice of decoders with experts)."""
        return self.mlp(x)

    def construct(self, x, cos, sin, mask, cache_k, cache_v, valid_length, decode, route=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_k, cache_v, valid_length, decode,
                               route)  # [B,S,H]
        return x + self.feed_forward(self.post_attention_layernorm(x), route)  # [B,S,H]


class LlamaModel(Decoder):
    """LLaMA decoder with the LLM interface of `llm/base.py`."""

    block_class = LlamaBlock

    def __init__(self, config):
        super().__init__(config)
        precision = self.precision
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, precision=precision)
        self.rotary = Rotary(config.head_dim, config.rope_theta)
        self.layers = nn.CellList([self.block_class(config, precision) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, has_bias=False, precision=self.head_precision)

    @classmethod
    def position_scheme(cls, config):
        return CausalPositions()

    def cache_shape(self, batch, seq_length):
        return (batch, self.config.num_kv_heads, seq_length, self.config.head_dim)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)  # [B,S,H]

    def final_norm(self, x):
        return self.norm(x)
