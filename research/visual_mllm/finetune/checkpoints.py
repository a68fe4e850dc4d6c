"""Resumable training checkpoints, written atomically.

Layout (one folder per rank; with data parallel every rank keeps its own, identical, copy)::

    <output_dir>/checkpoints/rank_<r>/step_000050/
        lora.ckpt          the trainable parameters only + the LoRA layout (what inference loads)
        train_state.ckpt   optimizer moments and step, loss-scale state
        state.json         step, data-order settings, metrics of the last step

Resuming reproduces the uninterrupted run bit for bit: the data order is a function of (seed, step), and
weights, Adam moments, the optimizer step and the loss-scale state are restored. With `lora.dropout > 0`
the dropout masks come from MindSpore's kernel RNG, which is not checkpointed: a resumed run then differs
in its masks (the reference uses dropout 0).

A checkpoint folder is written under a temporary name and renamed into place when complete, so a run
killed half-way never leaves a half-written checkpoint that --resume would pick up. The newest
`keep` folders are kept.
"""
import json
import os
import re
import shutil

import mindspore as ms
from mindspore import Tensor

from .lora import save_lora_checkpoint

STEP_DIR = re.compile(r"^step_(\d+)$")
LORA_FILE = "lora.ckpt"
STATE_FILE = "train_state.ckpt"
META_FILE = "state.json"


class ResumeError(ValueError):
    """The checkpoint to resume from is missing or does not match this run."""


def _optimizer_state(optimizer, loss_scaler):
    """[(name, Parameter)] of everything besides the weights that a resumed run needs."""
    state = [("optimizer.global_step", optimizer.global_step)]
    for param, m, v in zip(optimizer.parameters, optimizer.moments1, optimizer.moments2):
        state.append((f"optimizer.adam_m.{param.name}", m))
        state.append((f"optimizer.adam_v.{param.name}", v))
    if loss_scaler is not None:
        for attr in ("scale_value", "counter"):
            value = getattr(loss_scaler, attr, None)
            if value is not None:
                state.append((f"loss_scale.{attr}", value))
    return state


class CheckpointManager:
    def __init__(self, folder, keep=3):
        self.folder = os.path.abspath(folder)
        self.keep = int(keep)

    def step_dir(self, step):
        return os.path.join(self.folder, f"step_{step:06d}")

    def steps(self):
        if not os.path.isdir(self.folder):
            return []
        found = []
        for name in os.listdir(self.folder):
            match = STEP_DIR.match(name)
            if match and os.path.isfile(os.path.join(self.folder, name, META_FILE)):
                found.append(int(match.group(1)))
        return sorted(found)

    def latest(self):
        steps = self.steps()
        return (steps[-1], self.step_dir(steps[-1])) if steps else None

    def save(self, step, model, optimizer, loss_scaler, lora_settings, meta):
        """Write checkpoint `step` atomically; returns its folder."""
        os.makedirs(self.folder, exist_ok=True)
        final = self.step_dir(step)
        tmp = os.path.join(self.folder, f".tmp_step_{step:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_lora_checkpoint(model, os.path.join(tmp, LORA_FILE), lora_settings)
        ms.save_checkpoint([{"name": n, "data": p} for n, p in _optimizer_state(optimizer, loss_scaler)],
                           os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(dict(meta, step=step), f, indent=1, ensure_ascii=False)
        if os.path.isdir(final):  # the same step written again (e.g. after an interrupt): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.steps()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(self.step_dir(old), ignore_errors=True)
        return final


def resolve_resume(target, default_folder):
    """The checkpoint folder to resume from: `target` may be 'auto' (newest in default_folder), a
    checkpoints folder (newest inside), or one step folder."""
    if target in (None, "", "auto"):
        target = default_folder
    target = os.path.abspath(target)
    if os.path.isfile(os.path.join(target, META_FILE)):
        return target
    latest = CheckpointManager(target).latest()
    if latest is None:
        raise ResumeError(f"--resume: no complete checkpoint in {target}")
    return latest[1]


def restore(folder, model, optimizer, loss_scaler, expect):
    """Load a checkpoint folder into the model/optimizer/scaler; returns its state.json dict.

    expect: settings that must match the checkpoint for an exact continuation (global batch, seed ...).
    """
    from .lora import read_lora_checkpoint

    with open(os.path.join(folder, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    differ = [f"{k}: checkpoint {meta.get(k)!r}, this run {v!r}" for k, v in expect.items() if meta.get(k) != v]
    if differ:
        raise ResumeError(f"cannot resume from {folder}: the run settings differ ({'; '.join(differ)})")
    _, arrays = read_lora_checkpoint(os.path.join(folder, LORA_FILE))
    weights = {p.name: p for p in model.get_parameters()}
    trainable = {p.name for p in optimizer.parameters}
    if set(arrays) - set(weights) or trainable - set(arrays):
        raise ResumeError(f"cannot resume from {folder}: its trainable parameters differ from this run's "
                          f"(extra {sorted(set(arrays) - set(weights))[:5]}, missing "
                          f"{sorted(trainable - set(arrays))[:5]})")
    state = ms.load_checkpoint(os.path.join(folder, STATE_FILE))
    targets = dict(_optimizer_state(optimizer, loss_scaler))
    missing = sorted(set(targets) - set(state))
    if missing:
        raise ResumeError(f"cannot resume from {folder}: train_state.ckpt lacks {missing[:5]}")
    for name, array in arrays.items():
        weights[name].set_data(Tensor(array, weights[name].dtype))
    for name, param in targets.items():
        param.set_data(Tensor(state[name].asnumpy(), param.dtype))
    return meta


__all__ = ["CheckpointManager", "ResumeError", "resolve_resume", "restore", "LORA_FILE", "STATE_FILE", "META_FILE"]
