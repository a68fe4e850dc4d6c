"""GRAPH_MODE benchmark: aot weight-only linear vs fp32 Dense / MatMul / cast-in-graph baselines.
usage: python ms_bench.py N K  (M in 1, 8, 64); ratios are medians of interleaved runs within this process."""
import os, sys, time
import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wq_ops import WQLinear, wq_dequant_op, bf16_bits, quant_int8

ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
N, K = int(sys.argv[1]), int(sys.argv[2])
Ms = [int(v) for v in os.environ.get("MS", "1,8,64").split(",")]
REPS = int(os.environ.get("REPS", 30))
rng = np.random.default_rng(0)
w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02)
w16 = w.astype(np.float16)
wbf = (bf16_bits(w).astype(np.uint32) << 16).view(np.float32)
q, s = quant_int8(w)


class MatMulNet(nn.Cell):
    def __init__(self, wt):
        super().__init__()
        self.weight = Parameter(Tensor(wt), name="weight", requires_grad=False)
        self.mm = ops.MatMul(transpose_b=True)
    def construct(self, x):
        return self.mm(x, self.weight)


class CastNet(nn.Cell):   # low-precision W stored, cast to fp32 inside the graph, fp32 MatMul
    def __init__(self, wt, scale=None):
        super().__init__()
        self.weight = Parameter(wt, name="weight", requires_grad=False)
        self.has_scale = scale is not None
        self.scale = Parameter(Tensor(scale if scale is not None else np.ones(1, np.float32)), name="scale",
                               requires_grad=False)
        self.mm = ops.MatMul(transpose_b=True)
    def construct(self, x):
        y = self.mm(x, ops.cast(self.weight, ms.float32))
        if self.has_scale:
            y = y * self.scale
        return y


class DeqMatMulNet(nn.Cell):   # aot dequant to fp32 W, then MindSpore's fp32 MatMul
    def __init__(self, qw, scale):
        super().__init__()
        self.weight = Parameter(Tensor(qw), name="weight", requires_grad=False)
        self.scale = Parameter(Tensor(scale), name="scale", requires_grad=False)
        self.deq = wq_dequant_op()
        self.mm = ops.MatMul(transpose_b=True)
    def construct(self, x):
        return self.mm(x, self.deq(self.weight, self.scale))


dense = nn.Dense(K, N, has_bias=False, weight_init=Tensor(w))
nets = {
    "dense_f32": (dense, w, None),
    "matmul_f32": (MatMulNet(w), w, None),
    "cast_f16": (CastNet(Tensor(w16)), w16.astype(np.float32), None),
    "cast_i8": (CastNet(Tensor(q), s), q.astype(np.float32) * s[:, None], None),
    "aot_f16": (WQLinear(w, "float16"), w16.astype(np.float32), None),
    "aot_f16_1t": (WQLinear(w, "float16"), w16.astype(np.float32), "1"),
    "aot_bf16": (WQLinear(w, "bfloat16"), wbf, None),
    "aot_i8": (WQLinear(w, "int8"), q.astype(np.float32) * s[:, None], None),
    "aot_i8_1t": (WQLinear(w, "int8"), q.astype(np.float32) * s[:, None], "1"),
    "aotdeq_i8+mm": (DeqMatMulNet(q, s), q.astype(np.float32) * s[:, None], None),
}
try:   # is there a CPU Cast for bf16 at all?
    nets["cast_bf16"] = (CastNet(Tensor(w).astype(ms.bfloat16)), wbf, None)
except Exception as e:
    print("cast_bf16 construct failed:", str(e)[:200])

def run(name, x):
    net, _, th = nets[name]
    if th: os.environ["WQ_NUM_THREADS"] = th
    else: os.environ.pop("WQ_NUM_THREADS", None)
    out = net(x)
    out.asnumpy()   # forces completion (CPU); same small copy for every variant
    return out

print(f"N={N} K={K}")
for M in Ms:
    xn = np.random.default_rng(M).standard_normal((M, K), dtype=np.float32)
    x = Tensor(xn)
    active = []
    for name, (net, wref, _) in list(nets.items()):
        try:
            t0 = time.perf_counter(); y = run(name, x).asnumpy(); t1 = time.perf_counter()
            ref = xn.astype(np.float64) @ wref.astype(np.float64).T
            err = np.abs(y - ref).max()
            print(f"  M={M} {name:14s} first-call {1e3*(t1-t0):8.1f} ms  max|err| vs fp64(ref W) {err:.2e}", flush=True)
            active.append(name)
        except Exception as e:
            print(f"  M={M} {name} FAILED: {str(e).splitlines()[0][:200]}")
            nets.pop(name)
    for _ in range(3):
        for name in active: run(name, x)
    ts = {n: [] for n in active}
    for _ in range(REPS):
        for name in active:
            t = time.perf_counter(); run(name, x); ts[name].append(time.perf_counter() - t)
    base = np.median(ts["dense_f32"])
    for name in active:
        med = np.median(ts[name])
        print(f"M={M:3d} {name:14s} median {1e3*med:8.2f} ms  min {1e3*min(ts[name]):8.2f} ms  ratio_vs_dense {med/base:5.2f}")
