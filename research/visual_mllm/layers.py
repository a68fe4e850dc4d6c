"""Small building blocks shared by every tower.

Everything here runs on CPU, GPU and Ascend alike: only primitives with kernels on all three are
used, and numerically sensitive parts (LayerNorm, attention scores, softmax) run in float32
whatever the weight dtype.

Precision: a tower's Linear and Embedding weights are stored in its `param_dtype` and used in its
`compute_dtype` (`Precision`); with float16/bfloat16 storage and float32 compute (the CPU setting) the
weights take half the memory and the numbers are those of float32 compute on the stored values. Norm
weights stay float32. With `quantize: int8` a tower's Linear layers hold weight-only int8 (W8A16):
`weight` int8 [out, in] and a float32 `weight_scale` [out] per output channel (symmetric).
How a stored weight meets float32 activations: at CPU inference the `cpu_kernels` matmul reads it as
stored; in training and in exported graphs (`portable_graphs`) it is widened (and dequantised) inside
the graph where it is used; on Ascend, int8 goes through WeightQuantBatchMatmul.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common import np_dtype
from mindspore.common.initializer import Constant, Initializer, Normal, initializer
from mindspore.ops.auto_generate import WeightQuantBatchMatmul

from . import cpu_kernels

SQRT_HALF = 1.0 / math.sqrt(2.0)
MASK_FILL = -10000.0  # the reference code's additive mask value (not -inf: fully masked rows stay finite)
# q k^T with k read as stored: a swapaxes before a matmul copies k (on CPU, the whole KV cache every decode step)
QUERY_KEY = ops.BatchMatMul(transpose_b=True)


DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def numpy_dtype(dtype):
    """The numpy dtype of a MindSpore dtype (bfloat16: MindSpore's numpy type); what the deprecated
    `mindspore.dtype_to_nptype` gave."""
    return np_dtype.bfloat16 if dtype == ms.bfloat16 else np.dtype(str(dtype).lower())


class PrecisionError(ValueError):
    """A tower's compute dtype has no kernel on this device."""


@dataclass(frozen=True)
class Precision:
    """Where a tower's weights live (`param`) and in which dtype its matmuls run (`compute`)."""

    param: object = ms.float32
    compute: object = ms.float32
    quantize: Optional[str] = None  # "int8": the Linear layers hold int8 weights + per-channel scales

    @classmethod
    def of(cls, config):
        """The Precision of a TowerConfig on the device MindSpore runs on (`auto` resolved)."""
        device = ms.get_context("device_target")
        compute = config.compute_dtype
        if compute == "auto":
            compute = "float16" if device == "Ascend" else "float32"
        if compute == "bfloat16" and device == "CPU":
            raise PrecisionError(
                f"{type(config).__name__}: compute_dtype bfloat16 cannot run on the CPU (MindSpore has no "
                "bfloat16 matmul kernel there): use compute_dtype float32 (or auto) and keep param_dtype "
                "bfloat16 to hold the weights in half the memory")
        return cls(DTYPES[config.param_dtype], DTYPES[compute], config.quantize)


FP32 = Precision()
HALF = (ms.float16, ms.bfloat16)
INT8_MAX = 127  # symmetric: -127..127, so that -w quantises to -q
SCALE_SUFFIX = "_scale"  # an int8 `weight`'s per-channel scales are the Parameter `weight_scale`


QUANTIZE_ROWS = 64  # rows quantised at a time: a float32 block of them stays in the CPU cache


def quantize_int8(weight):
    """Per-output-channel symmetric int8 of a float [out, in] array -> (int8 [out, in], float32 scale [out]).

    One pass over the weight in blocks of QUANTIZE_ROWS rows, each widened once into a reused float32
    buffer (a 7B LLM quantises as it loads without a float32 copy of any whole matrix). No clip is
    needed: |w| <= max|w| of its row, so |w / scale| rounds to at most INT8_MAX."""
    w = np.asarray(weight)
    out_features, in_features = w.shape
    q = np.empty((out_features, in_features), np.int8)  # [out, in]
    scale = np.empty(out_features, np.float32)  # [out]
    block = np.empty((QUANTIZE_ROWS, in_features), np.float32)  # [rows, in]
    for start in range(0, out_features, QUANTIZE_ROWS):
        rows = block[:min(QUANTIZE_ROWS, out_features - start)]
        np.copyto(rows, w[start:start + len(rows)])
        row_scale = np.maximum(rows.max(axis=1), -rows.min(axis=1)) / np.float32(INT8_MAX)  # [rows]
        row_scale[row_scale == 0] = 1.0  # an all-zero row stays zero with any scale
        np.divide(rows, row_scale[:, None], out=rows)
        np.rint(rows, out=rows)
        np.copyto(q[start:start + len(rows)], rows, casting="unsafe")
        scale[start:start + len(rows)] = row_scale
    return q, scale


def fused_int8_matmul(precision):
    """Whether an int8 Linear of this precision runs MindSpore's WeightQuantBatchMatmul (Ascend only: the int8
    weight is read as stored and scaled inside the matmul, no float copy; it takes float16/bfloat16 inputs).
    Elsewhere the weight is widened in the graph and the scales multiply the output."""
    return precision.quantize == "int8" and precision.compute in HALF and ms.get_context("device_target") == "Ascend"


def cpu_weight_only(precision):
    """Whether a Linear of this precision runs cpu_kernels' weight-only matmul at inference (CPU, float32
    compute, float16/bfloat16/int8 weights, kernel built): the weight is read as stored, never widened."""
    return (precision.compute == ms.float32 and (precision.quantize == "int8" or precision.param in HALF)
            and ms.get_context("device_target") == "CPU" and cpu_kernels.available())


class QuantizedNormal(Initializer):
    """Random int8 weights whose dequantised values (x `scale`) are N(0, sigma^2) clipped at 3 sigma, for
    randomly initialised int8 models (demos, tests); real ones come from a checkpoint."""

    def __init__(self, sigma):
        super().__init__(sigma=sigma)
        self.sigma = sigma
        self.scale = 3.0 * sigma / INT8_MAX

    def _initialize(self, arr):
        values = np.zeros(arr.shape, np.float32)
        Normal(self.sigma)._initialize(values)  # MindSpore's seeded normal, as the float weights get
        arr[...] = np.clip(np.rint(values / self.scale), -INT8_MAX, INT8_MAX)


class Linear(nn.Dense):
    """A Linear layer whose weight is (out_features, in_features), as in PyTorch checkpoints, stored in
    `precision.param` and multiplied in `precision.compute`; the output is in the compute dtype.

    An nn.Dense, so that LoRA (mindpet's LoRADense) can take its place in finetuning.
    Random weights are N(0, 1/in_features): activations keep unit scale, so a randomly initialised
    model (the built-in demo, tests) still depends on its input. Real weights always come from a
    checkpoint.
    """

    def __init__(self, in_features, out_features, has_bias=True, precision=FP32):
        sigma = 1.0 / math.sqrt(in_features)
        int8 = precision.quantize == "int8"
        weight_init = QuantizedNormal(sigma) if int8 else Normal(sigma)
        super().__init__(in_features, out_features, weight_init="zeros" if int8 else weight_init,
                         bias_init="zeros", has_bias=has_bias, dtype=precision.param)
        self.precision = precision
        self.compute = precision.compute
        self.int8 = int8
        self.fused_int8 = fused_int8_matmul(precision)
        if self.fused_int8:  # y = x @ (weight * scale)^T, weight [out, in] as stored
            self.weight_quant_matmul = WeightQuantBatchMatmul(transpose_x=False, transpose_weight=True)
        # at inference (not in training: the kernel has no gradient) unless portable_graphs() turns it off
        self.cpu_kernel = cpu_weight_only(precision)
        if self.cpu_kernel:
            self.weight_only_matmul = cpu_kernels.weight_only_matmul()
        # constants: the graph casts only when needed
        self.widen = not self.fused_int8 and (int8 or precision.param != precision.compute)
        self.cast_input = self.widen or precision.compute != ms.float32
        self.cast_bias = precision.param != precision.compute
        if int8:
            self.weight = Parameter(initializer(weight_init, (out_features, in_features), ms.int8), name="weight")
            self.weight_scale = Parameter(initializer(Constant(weight_init.scale), (out_features,), ms.float32),
                                          name="weight" + SCALE_SUFFIX)

    def construct(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, in]
        if self.cpu_kernel and not self.training:  # the stored weight, read as it is
            if self.int8:
                y = self.weight_only_matmul(x.astype(ms.float32), self.weight, self.weight_scale)  # [N, out]
            else:
                y = self.weight_only_matmul(x.astype(ms.float32), self.weight)  # [N, out]
            if self.has_bias:
                y = self.bias_add(y, self.bias.astype(ms.float32))
            return y.reshape(shape[:-1] + (y.shape[-1],))  # [..., out]
        weight = self.weight  # [out, in]
        if self.widen:  # the cast waits for x: else graph mode widens every weight of the model at once
            weight = ops.depend(weight, x).astype(self.compute)  # (a float32 copy of all of them, measured)
        if self.cast_input:  # float32 compute takes x as it comes, as nn.Dense does (mixed-precision
            x = x.astype(self.compute)  # training casts inputs and weights itself)
        if self.fused_int8:
            y = self.weight_quant_matmul(x, weight, self.weight_scale.astype(self.compute), None, None, None,
                                         None)  # [N, out]
        else:
            y = self.matmul(x, weight)  # [N, out]
        if self.int8 and not self.fused_int8:
            y = y * self.weight_scale.astype(self.compute)  # per output channel
        if self.has_bias:
            y = self.bias_add(y, self.bias.astype(self.compute) if self.cast_bias else self.bias)
        return y.reshape(shape[:-1] + (y.shape[-1],))  # [..., out]


@contextlib.contextmanager
def portable_graphs(model):
    """Within it, every Linear of `model` compiles without cpu_kernels (graphs to export: an aot op names its
    library by an absolute path of this machine)."""
    linears = [cell for _, cell in model.cells_and_names() if isinstance(cell, Linear) and cell.cpu_kernel]
    for cell in linears:
        cell.cpu_kernel = False
    try:
        yield
    finally:
        for cell in linears:
            cell.cpu_kernel = True


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


def table_dtype(precision):
    """The dtype an embedding table is stored in: the tower's, except bfloat16 on CPU, where MindSpore's
    Gather has no bfloat16 kernel (float32 then: exact, and the table is a small part of the model)."""
    if precision.param == ms.bfloat16 and ms.get_context("device_target") == "CPU":
        return ms.float32
    return precision.param


class Embedding(nn.Cell):
    """Token embedding table `weight` [vocab, hidden], as named in PyTorch checkpoints; rows come out in
    the compute dtype."""

    def __init__(self, vocab_size, hidden_size, std=1.0, precision=FP32):
        super().__init__()
        self.compute = precision.compute
        self.widen = table_dtype(precision) != precision.compute  # a constant, as in Linear
        self.weight = Parameter(initializer(Normal(std), (vocab_size, hidden_size), table_dtype(precision)),
                                name="weight")

    def construct(self, input_ids):
        rows = ops.gather(self.weight, input_ids, 0)  # [B,S,H]
        return rows.astype(self.compute) if self.widen else rows


class MLP(nn.Cell):
    """fc1 -> GELU -> fc2; `approximate` is "none" (erf, ViT/Q-Former) or "tanh" (GLM)."""

    def __init__(self, hidden_size, inner_size, approximate="none", precision=FP32):
        super().__init__()
        self.approximate = approximate
        self.fc1 = Linear(hidden_size, inner_size, precision=precision)
        self.fc2 = Linear(inner_size, hidden_size, precision=precision)

    def construct(self, x):
        h = self.fc1(x)  # [B, S, inner]
        if self.approximate == "none":  # written out: in a CPU graph, ops.gelu(approximate="none") keeps its
            h = h * 0.5 * (1.0 + ops.erf(h * SQRT_HALF))  # intermediates to the graph's end (ViT-g: ~1 GB)
        else:
            h = ops.gelu(h, approximate=self.approximate)
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

    def __init__(self, hidden_size, inner_size, precision=FP32):
        super().__init__()
        self.inner_size = inner_size
        self.gate_up = Linear(hidden_size, 2 * inner_size, has_bias=False, precision=precision)
        self.down = Linear(inner_size, hidden_size, has_bias=False, precision=precision)

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
