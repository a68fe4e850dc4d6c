"""Native CPU kernels built on first use: the one place that compiles and loads native code.

`weight_only_matmul()` is a MindSpore aot op: y [M, N] float32 = x [M, K] float32 . W [N, K]^T (* scale [N])
with W held as float16, bfloat16 or int8 (+ its per-channel float32 scale) and read as stored. MindSpore's CPU
backend has no such kernel: widening the weight in the graph first costs 2.4-17x a float32 matmul per decode
step and a float32 copy of the weight while it runs (the largest, lm_head, is 2 GB for VisualGLM-6B). The
kernel (weight_only.cc, weight_only_kernel.inc) picks AVX-512, AVX2 or a portable vector path at run time,
splits output rows over WQ_NUM_THREADS threads (default: every core), and sums in float32.

It is compiled with $CXX (default g++) into the per-user cache ($VISUAL_MLLM_CACHE, default
~/.cache/visual_mllm), once per machine and source version (~10 s), written atomically so that concurrent
processes agree. Where it cannot be built (no compiler) or VISUAL_MLLM_CPU_KERNELS=0, `available()` is False,
the layers take their portable graph path (the same numbers, slower) and the reason is printed once on stderr.
Exported graphs never use it (an aot op records the library's absolute path: layers.portable_graphs).
"""
import functools
import hashlib
import os
import subprocess
import sys
import tempfile

from ..paths import cache_dir

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("weight_only.cc", "weight_only_kernel.inc")
ENTRY = "WqLinear"
FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno")
SWITCH = "VISUAL_MLLM_CPU_KERNELS"  # 0 = never build or use the kernels


def source_key(compiler):
    """Hash of the sources, the flags and the compiler: a new version of any builds a new library."""
    digest = hashlib.sha256(" ".join((compiler,) + FLAGS).encode())
    for name in SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def build(compiler, folder):
    """Compile the kernel library into `folder` (atomically); returns its path. Raises OSError or
    CalledProcessError when the compiler is missing or fails."""
    path = os.path.join(folder, f"weight_only-{source_key(compiler)}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=folder)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", partial, os.path.join(HERE, SOURCES[0])], check=True,
                       capture_output=True, text=True, timeout=600)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


@functools.lru_cache(maxsize=None)
def library():
    """Path of the built kernel library, or None (with one line on stderr saying why) when unavailable."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CXX", "g++")
    try:  # a library built before needs no compiler
        return build(compiler, os.path.join(cache_dir(), "kernels"))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        print(f"visual_mllm: CPU kernels unavailable ({detail.strip().splitlines()[-1] if detail.strip() else err}); "
              f"half-precision and int8 weights are widened in the graph instead (slower, same numbers)",
              file=sys.stderr)
        return None


def available():
    return library() is not None


def weight_only_matmul():
    """The aot op y = x . W^T (* scale): inputs x float32 [M, K], W [N, K] (float16 | bfloat16 | int8), and for
    int8 the scale float32 [N]; output float32 [M, N]. Only when available()."""
    from mindspore import float32, ops

    return ops.Custom(f"{library()}:{ENTRY}", out_shape=lambda x, w, *scale: tuple(x[:-1]) + (w[0],),
                      out_dtype=lambda *dtypes: float32, func_type="aot")
