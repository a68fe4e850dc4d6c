"""Running a Plan: tensor by tensor from the mapped source into the writers, with a byte-weighted progress bar.

Each step loads its source tensors (pages of the mapped file), applies its transform, casts the
results to the output dtype and hands each to the writer(s) of its output file(s); then everything
is dropped before the next step. The only anonymous memory is therefore one step's results (at most
a few times the largest tensor), whatever the size of the checkpoint.
"""
import platform
import sys
import threading
from importlib import metadata

import torch
from tqdm import tqdm

from .readers import sha256_file

# --dtype choices: "auto" keeps every tensor's own dtype
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def output_dtype(dtype, requested):
    """The dtype a tensor is written in: `requested` for floating tensors, else unchanged."""
    return requested if requested is not None and dtype.is_floating_point else dtype


def target_dtype(plan, name, dtype, requested):
    """The dtype target `name` of `plan` is written in: its own for the plan's `exact_dtype` targets
    (int8 weights' float32 scales), else output_dtype."""
    return dtype if name in plan.exact_dtype else output_dtype(dtype, requested)


def planned_outputs(plan, requested):
    """[(target, meta tensor in the output dtype)] in conversion order."""
    return [(name, meta.to(target_dtype(plan, name, meta.dtype, requested))) for name, meta in plan.targets.items()]


def converted_tensors(plan, requested):
    """(target, tensor in its output dtype) for every target of `plan`, one step at a time."""
    for step in plan.steps:
        outputs = step.rule.transform(*(plan.source[key].load() for key in step.rule.sources))
        for name, tensor in zip(step.rule.targets, outputs):
            yield name, tensor.to(target_dtype(plan, name, tensor.dtype, requested))
        outputs = tensor = None  # nothing of this step stays alive while the next one loads


def execute(plan, writers_for, requested, description):
    """Convert every step of `plan`; writers_for: {target: [writer, ...]} (a target may go to several files)."""
    total = sum(meta.numel() * meta.dtype.itemsize * len(writers_for[name]) for name, meta in planned_outputs(plan, requested))
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
              file=sys.stderr, mininterval=1.0, dynamic_ncols=True) as bar:
        for name, tensor in converted_tensors(plan, requested):
            for writer in writers_for[name]:
                writer.add(name, tensor)
                bar.update(tensor.numel() * tensor.dtype.itemsize)
            tensor = None  # the generator drops its step's tensors before loading the next step's


class BackgroundHashes:
    """sha256 of files computed on a daemon thread while the conversion runs (hashlib releases the GIL).

    `cancel()` stops it at the next 16 MiB block, so an interrupted conversion exits at once.
    """

    def __init__(self, paths):
        self._paths = list(paths)
        self._hashes = {}
        self._error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for path in self._paths:
                self._hashes[path] = sha256_file(path, stop=self._stop)
        except OSError as err:
            self._error = err

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._hashes)

    def cancel(self):
        self._stop.set()


def tool_versions():
    versions = {"python": platform.python_version()}
    for package in ("visual_mllm", "mindspore", "mindformers", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
