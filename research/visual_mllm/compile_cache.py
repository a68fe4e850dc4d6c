"""MindSpore's graph compile cache, in a per-user folder keyed by what decides the compiled graphs.

With MS_COMPILER_CACHE_ENABLE=1, MindSpore saves every graph a process compiles under
MS_COMPILER_CACHE_PATH (read at the process's first compilation) as `rank_0/graph_cache/compile_cache_<n>.mindir`,
n counting the compilations, and a later process with the same path loads file n for its n-th compilation
instead of compiling, without checking that it is the same graph: a run whose sequence of graphs differs
(another config, batch size or prompt-length bucket) gets wrong graphs (measured: a GatherD index error, or
wrong tokens). So each run type has its own folder, `<cache>/compile/<key>`, the key hashing the package
version and sources, the MindSpore version and the caller's description of the run (model config, graph shapes,
flags): only a run that compiles the same graphs in the same order shares a folder. The KEEP folders used
last are kept, older ones deleted.

run_infer.py uses it; run_finetune.py does not: a LoRA train step loaded from this cache returned NaN loss
and gradients from its first step (MindSpore 2.9 on CPU, the tiny demo's finetune), where the compiled one
trains normally.
"""
import glob
import hashlib
import json
import os
import shutil

from .paths import PACKAGE_DIR, cache_dir

KEEP = 20  # cache folders (run types) kept; the tiny demo's takes 0.6 MB


def sources_fingerprint():
    """The package's Python sources by name, size and modification time (an edited checkout is a new key)."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(PACKAGE_DIR, "**", "*.py"), recursive=True)):
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, PACKAGE_DIR)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folder_for(run):
    """The cache folder of a run described by `run` (anything json can write, str() for the rest)."""
    import mindspore as ms

    from . import __version__

    key = json.dumps([__version__, ms.__version__, sources_fingerprint(), run], sort_keys=True, default=str)
    return os.path.join(cache_dir(), "compile", hashlib.sha256(key.encode()).hexdigest()[:16])


def enable(run):
    """Turn MindSpore's compile cache on for this process, in the folder of `run`; call it before the first
    graph is compiled. Returns the folder."""
    folder = folder_for(run)
    os.makedirs(folder, exist_ok=True)
    os.utime(folder)  # used now: the folders used least recently go first
    prune(os.path.dirname(folder))
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = folder
    return folder


def prune(root, keep=KEEP):
    """Delete all but the `keep` folders of `root` used last."""
    folders = sorted((entry for entry in os.scandir(root) if entry.is_dir()), key=lambda e: e.stat().st_mtime_ns)
    for entry in folders[:-keep]:
        shutil.rmtree(entry.path, ignore_errors=True)


def cached_graphs(folder):
    """{file name: (size, modification time)} of the graphs saved in `folder`."""
    found = glob.glob(os.path.join(folder, "**", "compile_cache_*.mindir"), recursive=True)
    return {os.path.basename(path): (os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in found}
