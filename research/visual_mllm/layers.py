"""Small building blocks shared by every tower.

Everything here runs on CPU, GPU and Ascend alike: only primitives with kernels on all three are
used, and numerically sensitive parts (LayerNorm, attention scores, softmax) run in float32
whatever the weight dtype.
"""
import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

MASK_FILL = -10000.0  # the reference code's additive mask value (not -inf: fully masked rows stay finite)
# q k^T with k read as stored: a swapaxes before a matmul copies k (on CPU, the whole KV cache every decode step)
QUERY_KEY = ops.BatchMatMul(transpose_b=True)


def dense(in_features, out_features, has_bias=True):
    """A Linear layer whose weight is (out_features, in_features), as in PyTorch checkpoints.

    Random weights are N(0, 1/in_features): activations keep unit scale, so a randomly initialised
    model (the built-in demo, tests) still depends on its input. Real weights always come from a
    checkpoint.
    """
    return nn.Dense(in_features, out_features, has_bias=has_bias,
                    weight_init=Normal(1.0 / math.sqrt(in_features)), bias_init="zeros")


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, computed in float32, with `weight`/`bias` names as in PyTorch."""

    def __init__(self, size, eps):
        super().__init__()
        self.weight = Parameter(initializer("ones", (size,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (size,), ms.float32), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        out, _, _ = self.norm(x.astype(ms.float32), self.weight, self.bias)
        return out.astype(x.dtype)


class Embedding(nn.Cell):
    """Token embedding table `weight` [vocab, hidden], as named in PyTorch checkpoints."""

    def __init__(self, vocab_size, hidden_size, std=1.0):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (vocab_size, hidden_size), ms.float32), name="weight")

    def construct(self, input_ids):
        return ops.gather(self.weight, input_ids, 0)  # [B,S,H]


class MLP(nn.Cell):
    """fc1 -> GELU -> fc2; `approximate` is "none" (erf, ViT/Q-Former) or "tanh" (GLM)."""

    def __init__(self, hidden_size, inner_size, approximate="none"):
        super().__init__()
        self.approximate = approximate
        self.fc1 = dense(hidden_size, inner_size)
        self.fc2 = dense(inner_size, hidden_size)

    def construct(self, x):
        h = ops.gelu(self.fc1(x), approximate=self.approximate)  # [B, S, inner]
        return self.fc2(h)


class RMSNorm(nn.Cell):
    """LLaMA/Qwen RMSNorm over the last axis, computed in float32: x / sqrt(mean(x^2) + eps) * weight."""

    def __init__(self, size, eps):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (size,), ms.float32), name="weight")

    def construct(self, x):
        h = x.astype(ms.float32)
        h = h * ops.rsqrt(ops.mean(ops.square(h), -1, keep_dims=True) + self.eps)  # [..., size]
        return (h * self.weight).astype(x.dtype)


class SwiGLU(nn.Cell):
    """down(silu(gate(x)) * up(x)) without biases (LLaMA, Qwen). gate and up are one fused Linear
    `gate_up` (2*inner x hidden, rows [gate; up]): one matmul instead of two."""

    def __init__(self, hidden_size, inner_size):
        super().__init__()
        self.inner_size = inner_size
        self.gate_up = dense(hidden_size, 2 * inner_size, has_bias=False)
        self.down = dense(inner_size, hidden_size, has_bias=False)

    def construct(self, x):
        gate, up = ops.split(self.gate_up(x), self.inner_size, axis=-1)  # [B,S,inner] each
        return self.down(ops.silu(gate) * up)


def split_heads(x, num_heads):
    """[B, S, heads*d] -> [B, heads, S, d]"""
    b, s, _ = x.shape
    return x.reshape(b, s, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, heads, S, d] -> [B, S, heads*d]"""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention with scores and softmax in float32.

    q: [B, h, Sq, d]; k, v: [B, h, Sk, d]; mask: broadcastable to [B, h, Sq, Sk], 1 = may attend.
    Masking follows the reference: scores * mask - 10000 * (1 - mask).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = QUERY_KEY(q.astype(ms.float32), k.astype(ms.float32)) * scale  # [B,h,Sq,Sk]
    if mask is not None:
        mask = mask.astype(ms.float32)
        scores = scores * mask + MASK_FILL * (1.0 - mask)
    probs = ops.softmax(scores, axis=-1)
    return ops.matmul(probs, v.astype(ms.float32)).astype(v.dtype)  # [B,h,Sq,d]
