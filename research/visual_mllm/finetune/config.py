"""The `finetune:` section of a LoRA YAML, read strictly (an unknown key is an error naming it).

A finetune YAML is a run YAML (model + processor, usually through ``base_config: run_<model>.yaml``)
plus::

    finetune:
      dataset:      {path, format, max_source_length, max_target_length, truncate, english, shuffle, ...}
      lora:         {rank, alpha, dropout, layer_prefix, layers, target_modules, extra_targets}
      trainable:    []            # parameter-name patterns trained besides LoRA (projection, Q-Former ...)
      optimizer:    {beta1, beta2, eps, weight_decay, grad_clip}
      lr_schedule:  {type: AnnealingLR, learning_rate, warmup_steps, num_iters, decay_style, decay_ratio,
                     auto_warmup_steps, auto_warmup_rate}
      runner:       {batch_size, max_steps, save_steps, keep_checkpoints, seed, amp_level, loss_scale,
                     output_dir}

Relative dataset paths in the YAML (dataset.path, dataset.image_root) are relative to the YAML file;
runner.output_dir and every path on the command line are relative to the working directory.
"""
import copy
import os
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

from ..registry import plain
from .datasets import DatasetSettings
from .lora import LoraSettings, settings_from_dict


class FinetuneConfigError(ValueError):
    """The finetune section is missing or has unknown / invalid keys."""


@dataclass
class OptimizerSettings:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 0.1   # global-norm clipping; 0 = off


@dataclass
class LossScaleSettings:
    init: float = 65536.0
    factor: int = 2
    window: int = 400


@dataclass
class RunnerSettings:
    batch_size: int = 1           # per device (the global batch is batch_size x data-parallel ranks)
    max_steps: int = 100          # optimizer steps of the whole run
    save_steps: int = 50          # write a checkpoint every N steps (and at the end)
    keep_checkpoints: int = 3     # newest checkpoints kept
    seed: int = 1234              # LoRA initialisation and data order
    amp_level: str = "O0"         # O0 = float32; O1/O2 = mixed float16 (with dynamic loss scaling)
    loss_scale: LossScaleSettings = field(default_factory=LossScaleSettings)
    output_dir: str = "output/finetune"


@dataclass
class FinetuneConfig:
    dataset: DatasetSettings
    lora: LoraSettings
    trainable: List[str]
    optimizer: OptimizerSettings
    lr_schedule: Dict
    runner: RunnerSettings
    yaml_path: Optional[str] = None

    def lr_args(self, max_steps):
        """The lr_schedule section with num_iters defaulting to the run's max_steps."""
        args = dict(self.lr_schedule)
        args.setdefault("type", "AnnealingLR")
        if args.get("num_iters") in (None, 0):
            args["num_iters"] = int(max_steps)
        return args


def _build(cls, section, name):
    section = plain(section or {})
    if not isinstance(section, dict):
        raise FinetuneConfigError(f"finetune.{name} must be a mapping, got {type(section).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise FinetuneConfigError(f"finetune.{name}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**section)


def _relative_to(base_dir, path):
    if path in (None, "") or os.path.isabs(path) or base_dir is None:
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def parse_finetune_section(section, yaml_path=None):
    if section is None:
        raise FinetuneConfigError(f"{yaml_path or 'the config'} has no `finetune:` section "
                                  "(see configs/visualglm_tiny/lora.yaml)")
    section = plain(section)
    known = {"dataset", "lora", "trainable", "optimizer", "lr_schedule", "runner"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise FinetuneConfigError(f"finetune: unknown key(s) {unknown}; known keys: {sorted(known)}")
    base_dir = os.path.dirname(os.path.abspath(yaml_path)) if yaml_path else None
    dataset = _build(DatasetSettings, section.get("dataset"), "dataset")
    dataset.path = _relative_to(base_dir, dataset.path)
    dataset.image_root = _relative_to(base_dir, dataset.image_root)
    try:
        lora = settings_from_dict(section.get("lora"))
    except ValueError as err:
        raise FinetuneConfigError(f"finetune.lora: {err}") from err
    runner_section = dict(section.get("runner") or {})
    loss_scale = _build(LossScaleSettings, runner_section.pop("loss_scale", None), "runner.loss_scale")
    runner = _build(RunnerSettings, runner_section, "runner")
    runner.loss_scale = loss_scale
    if runner.amp_level not in ("O0", "O1", "O2"):
        raise FinetuneConfigError(f"finetune.runner.amp_level must be O0, O1 or O2, got {runner.amp_level!r}")
    trainable = section.get("trainable") or []
    if isinstance(trainable, str):
        trainable = [trainable]
    lr_schedule = dict(section.get("lr_schedule") or {"type": "AnnealingLR", "learning_rate": 1e-4})
    return FinetuneConfig(dataset, lora, list(trainable),
                          _build(OptimizerSettings, section.get("optimizer"), "optimizer"),
                          lr_schedule, runner, yaml_path)


def load_finetune_config(yaml_path):
    """(the run config as read by visual_mllm.read_run_config, FinetuneConfig)."""
    from ..registry import read_run_config

    run_config = read_run_config(yaml_path)
    return run_config, parse_finetune_section(copy.deepcopy(run_config.get("finetune")), yaml_path)


__all__ = ["FinetuneConfig", "FinetuneConfigError", "OptimizerSettings", "RunnerSettings", "LossScaleSettings",
           "load_finetune_config", "parse_finetune_section"]
