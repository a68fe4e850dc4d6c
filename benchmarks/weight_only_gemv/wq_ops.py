"""MindSpore wrappers around the aot kernels in wq_linear.so (prototype)."""
import os
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

HERE = os.path.dirname(os.path.abspath(__file__))
SO = os.path.join(HERE, "wq_linear.so")


def _lin_shape(xs, ws, *rest):
    return tuple(xs[:-1]) + (ws[0],)


def _lin_reg_info(n_inputs):
    from mindspore.ops import CustomRegOp, DataType
    r = CustomRegOp("WqLinearI8" if n_inputs == 3 else "WqLinear").input(0, "x").input(1, "w")
    if n_inputs == 3:
        r = r.input(2, "scale").output(0, "y").dtype_format(DataType.F32_Default, DataType.I8_Default,
                                                           DataType.F32_Default, DataType.F32_Default)
    else:
        r = r.output(0, "y")
        for wt in (DataType.F16_Default, DataType.BF16_Default, DataType.F32_Default):
            r = r.dtype_format(DataType.F32_Default, wt, DataType.F32_Default)
    return r.target("CPU").get_op_info()


def wq_linear_op(lib=SO, cpp_infer=False, n_inputs=2):
    """cpp_infer=True: shape/dtype inferred by WqLinearInferShape/WqLinearInferType inside the .so (needed for
    dynamic shapes in MINDIR files loaded without the Python lambdas)."""
    if cpp_infer:
        # MindSpore 2.9 needs a reg_info (it sets the 'reg_op_name' attr) for the C++ infer path, else
        # "The pointer[value] is null".  One op object per weight dtype keeps the dtype_format lists simple.
        return ops.Custom(f"{lib}:WqLinear", out_shape=None, out_dtype=None, func_type="aot",
                          reg_info=_lin_reg_info(n_inputs))
    return ops.Custom(f"{lib}:WqLinear", out_shape=_lin_shape, out_dtype=lambda *a: ms.float32, func_type="aot")


def wq_dequant_op(lib=SO):
    return ops.Custom(f"{lib}:WqDequant", out_shape=lambda ws, *r: tuple(ws), out_dtype=lambda *a: ms.float32,
                      func_type="aot")


def bf16_bits(w):
    """fp32 -> bf16 bit pattern (uint16), round to nearest even."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def quant_int8(w):
    s = (np.abs(w).max(1) / 127.0).astype(np.float32)
    s[s == 0] = 1.0
    return np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8), s


class WQLinear(nn.Cell):
    """y = x @ W^T (* scale) with W stored as float16 / bfloat16 / int8 (+ per-output-channel scale)."""

    def __init__(self, weight_fp32, mode="float16", lib=SO, cpp_infer=False):
        super().__init__()
        w = np.asarray(weight_fp32, np.float32)
        self.mode = mode
        if mode == "float16":
            self.weight = Parameter(Tensor(w.astype(np.float16)), name="weight", requires_grad=False)
        elif mode == "bfloat16":
            self.weight = Parameter(Tensor(w).astype(ms.bfloat16), name="weight", requires_grad=False)
        elif mode == "int8":
            q, s = quant_int8(w)
            self.weight = Parameter(Tensor(q), name="weight", requires_grad=False)
            self.scale = Parameter(Tensor(s), name="scale", requires_grad=False)
        else:
            raise ValueError(mode)
        self.op = wq_linear_op(lib, cpp_infer, 3 if mode == "int8" else 2)

    def construct(self, x):
        if self.mode == "int8":
            return self.op(x, self.weight, self.scale)
        return self.op(x, self.weight)
