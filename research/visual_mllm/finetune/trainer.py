"""The finetuning run: model + LoRA, data, the compiled train step, checkpoints, logs and resuming.

`finetune(options)` is what `run_finetune.py` runs. Started by `run_singlenode.sh` (MindSpore's dynamic
cluster on CPU: MS_ROLE/MS_NODE_ID/MS_WORKER_NUM/MS_SCHED_HOST/MS_SCHED_PORT; a rank table on Ascend),
by `msrun`, or with RANK_SIZE > 1, it joins the data-parallel group first: `mindspore.communication.init()`,
`DATA_PARALLEL` with gradient mean, each rank training on its shard of every global batch (see
`datasets.BatchSource`), so all ranks keep identical weights. Rank 0 writes the logs, the PNG and the
final LoRA checkpoint; every rank keeps its resumable checkpoints under `checkpoints/rank_<r>/` and ends
with a `timing:` line (its median step time).
"""
import functools
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..atomic import write_atomic, write_text_atomic
from .checkpoints import LORA_FILE, CheckpointManager, resolve_resume, restore
from .config import FinetuneConfigError, load_finetune_config
from .datasets import BATCH_KEYS, BatchSource, load_dataset
from .lora import apply_lora, load_lora_checkpoint, save_merged_model
from .lr_schedule import build_lr_schedule
from .reporting import Progress, TrainLog, plot_loss
from .train_step import LossNet, TrainStep, build_optimizer

CSV_NAME = "train_log.csv"
PNG_NAME = "loss_curve.png"
SUMMARY_NAME = "summary.json"
MERGED_DIR = "merged"
MERGED_YAML = "run_merged.yaml"
TIMING_PREFIX = "timing:"  # the per-rank line printed after training (benchmarks parse it)


@dataclass
class RunOptions:
    """Command-line overrides of the finetune YAML (None = keep the YAML's value)."""
    config: str
    dataset: Optional[str] = None
    output_dir: Optional[str] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    save_steps: Optional[int] = None
    seed: Optional[int] = None
    amp_level: Optional[str] = None
    resume: Optional[str] = None        # None = fresh run; "auto" = newest checkpoint of output_dir; or a path
    stop_at_step: Optional[int] = None  # stop after this step as an interruption would (no extra checkpoint)
    graph_mode: bool = True
    progress: Optional[bool] = None     # None = on for rank 0
    merge: bool = False                 # also write merged split checkpoints + a YAML for run_infer.py
    lora_checkpoint: Optional[str] = None  # with merge: merge this checkpoint instead of training
    quiet: bool = False


@dataclass
class RunResult:
    output_dir: str
    steps_done: int
    losses: List[float] = field(default_factory=list)
    lora_checkpoint: Optional[str] = None
    merged_yaml: Optional[str] = None
    trainable: int = 0
    step_time_s: Optional[float] = None     # median of the steps after the first (compiled) one
    samples_per_s: Optional[float] = None
    first_step_s: Optional[float] = None
    rank: int = 0
    world_size: int = 1
    model: object = field(default=None, repr=False)  # the trained model (LoRA cells in place, or merged)


def init_data_parallel():
    """(rank, world size); joins the collective group when started as a worker of MindSpore's dynamic
    cluster (MS_ROLE set: run_singlenode.sh on CPU, msrun) or with RANK_SIZE > 1 (Ascend rank table)."""
    import mindspore as ms

    launched = os.environ.get("MS_ROLE") is not None or int(os.environ.get("RANK_SIZE", "1") or 1) > 1
    if not launched:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, world = get_rank(), get_group_size()
    if world > 1:
        ms.reset_auto_parallel_context()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=world)
    return rank, world


class _StopSignal:
    """Ctrl-C / SIGTERM during training: finish the current step, write a checkpoint, then stop.

    (MindSpore's own SIGINT handling ends the process at once, losing the steps since the last checkpoint.)
    """

    def __init__(self):
        self.received = False
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not settable here
                pass

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        self.received = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _say(options, rank, text):
    if rank == 0 and not options.quiet:
        print(text, flush=True)


def apply_overrides(cfg, options):
    runner = cfg.runner
    for key in ("max_steps", "batch_size", "save_steps", "seed", "amp_level", "output_dir"):
        value = getattr(options, key)
        if value is not None:
            setattr(runner, key, value)
    if options.dataset is not None:
        cfg.dataset.path = options.dataset
    if options.learning_rate is not None:
        cfg.lr_schedule["learning_rate"] = options.learning_rate
    if runner.max_steps <= 0 or runner.batch_size <= 0 or runner.save_steps <= 0:
        raise FinetuneConfigError("max_steps, batch_size and save_steps must be positive")
    if cfg.dataset.path in (None, ""):
        raise FinetuneConfigError("no dataset: set finetune.dataset.path in the YAML or pass --dataset")
    return cfg


def _raw_yaml(path):
    """A YAML file as a dict with `base_config` files merged in (as MindFormerConfig does), untemplated."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    bases = data.pop("base_config", None)
    if not bases:
        return data
    from ..registry import merge_dicts

    merged = {}
    for base in bases if isinstance(bases, list) else [bases]:
        merged.update(_raw_yaml(os.path.join(os.path.dirname(os.path.abspath(path)), base)))
    return merge_dicts(merged, data)


def write_inference_yaml(config_path, checkpoints, out_path):
    """A run YAML for run_infer.py: the model/processor of `config_path` with the merged split checkpoints."""
    import yaml

    data = _raw_yaml(config_path)
    data.pop("finetune", None)
    model_config = data["model"]["model_config"]
    model_config.pop("checkpoint_name_or_path", None)
    model_config["vit_checkpoint"] = os.path.abspath(checkpoints["vit"])
    model_config["qformer_checkpoint"] = os.path.abspath(checkpoints["qformer"])
    model_config["llm_checkpoint"] = os.path.abspath(checkpoints["llm"])
    tokenizer = (data.get("processor") or {}).get("tokenizer") or {}
    vocab = tokenizer.get("vocab_file")
    if vocab and not os.path.isabs(vocab):
        tokenizer["vocab_file"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config_path)), vocab))
    header = (f"# Written by run_finetune.py --merge from {os.path.abspath(config_path)}:\n"
              "# the base model with the LoRA weights folded in (split checkpoints beside this file).\n")
    return write_text_atomic(out_path, header + yaml.safe_dump(data, allow_unicode=True, sort_keys=False))


def merge_and_save(model, config_path, output_dir):
    """Merge LoRA into the model and write split checkpoints + run_merged.yaml into output_dir/merged."""
    folder = os.path.join(output_dir, MERGED_DIR)
    paths = save_merged_model(model, folder)
    return write_inference_yaml(config_path, paths, os.path.join(folder, MERGED_YAML))


def merge_only(options):
    """--merge with --lora_checkpoint: base model from the YAML + the LoRA checkpoint -> merged files."""
    from .. import load_from_yaml

    run_config, cfg = load_finetune_config(options.config)
    del run_config
    output_dir = options.output_dir or cfg.runner.output_dir
    model, _ = load_from_yaml(options.config)
    load_lora_checkpoint(model, options.lora_checkpoint)
    merged_yaml = merge_and_save(model, options.config, output_dir)
    if not options.quiet:
        print(f"merged {options.lora_checkpoint} into the base weights: {merged_yaml}", flush=True)
    return RunResult(os.path.abspath(output_dir), 0, merged_yaml=merged_yaml, model=model)


def finetune(options: RunOptions) -> RunResult:
    """Train (or resume training) as the YAML and the options say; see the module docstring."""
    import mindspore as ms
    from mindspore import Tensor

    from .. import load_from_yaml

    if options.merge and options.lora_checkpoint:
        return merge_only(options)
    rank, world = init_data_parallel()
    _, cfg = load_finetune_config(options.config)
    cfg = apply_overrides(cfg, options)
    runner = cfg.runner
    output_dir = os.path.abspath(runner.output_dir)
    os.makedirs(output_dir, exist_ok=True)

    model, processor = load_from_yaml(options.config)
    llm_config = model.config.llm_config
    data = load_dataset(cfg.dataset, processor)
    if cfg.dataset.max_length > llm_config.max_position_embeddings:
        raise FinetuneConfigError(
            f"max_source_length + max_target_length = {cfg.dataset.max_length} exceeds the LLM's "
            f"context length {llm_config.max_position_embeddings}")
    _say(options, rank, f"dataset: {data.path} ({data.format}): {len(data.samples)} samples from "
                        f"{data.total_rows} rows, padded to {cfg.dataset.max_length} tokens")
    for warning in data.warnings:
        _say(options, rank, f"  warning: {warning}")

    if runner.amp_level != "O0" and cfg.lora.compute_dtype == "float32":
        cfg.lora.compute_dtype = "float16"  # mixed precision: LoRA computes in float16 like the layers around it
    ms.set_seed(runner.seed)  # LoRA's A matrices: the same on every rank and in every run
    summary = apply_lora(model, cfg.lora, cfg.trainable)
    _say(options, rank, summary.describe())

    loss_net = LossNet(model)
    loss_net.set_train(True)
    scaler = None
    if runner.amp_level != "O0":
        loss_net = ms.amp.auto_mixed_precision(loss_net, runner.amp_level)
        scale = runner.loss_scale
        scaler = ms.amp.DynamicLossScaler(float(scale.init), int(scale.factor), int(scale.window))
    schedule = build_lr_schedule(cfg.lr_args(runner.max_steps))
    opt = cfg.optimizer
    params = model.trainable_params()
    optimizer = build_optimizer(params, schedule, opt.beta1, opt.beta2, opt.eps, opt.weight_decay)
    step_fn = TrainStep(loss_net, optimizer, opt.grad_clip, scaler, world, compile=options.graph_mode)

    batches = BatchSource(data, processor, model.llm.positions, cfg.dataset, runner.batch_size,
                          seed=runner.seed, rank=rank, world_size=world)
    manager = CheckpointManager(os.path.join(output_dir, "checkpoints", f"rank_{rank}"), runner.keep_checkpoints)
    expect = {"seed": runner.seed, "global_batch": batches.global_batch, "num_samples": len(data.samples),
              "max_steps": runner.max_steps}
    start = 0
    if options.resume is not None:
        folder = resolve_resume(options.resume, manager.folder)
        meta = restore(folder, model, optimizer, scaler, expect)
        start = int(meta["step"])
        _say(options, rank, f"resumed from {folder} (step {start} of {runner.max_steps})")
    stop = runner.max_steps if options.stop_at_step is None else min(options.stop_at_step, runner.max_steps)

    log = TrainLog(os.path.join(output_dir, CSV_NAME), resume_step=start if options.resume is not None else None) \
        if rank == 0 else None
    show = rank == 0 and (options.progress if options.progress is not None else not options.quiet)
    progress = Progress(runner.max_steps, start, enabled=show)
    losses, times = [], []
    done = start
    first_step_s = None

    def save(step, last_loss):
        manager.save(step, model, optimizer, scaler, cfg.lora,
                     dict(expect, loss=last_loss, world_size=world, config=os.path.abspath(options.config)))

    stop_signal = _StopSignal()
    try:
        for step in range(start, stop):
            if stop_signal.received:
                raise KeyboardInterrupt
            batch = batches.batch(step)
            opt_step = int(np.asarray(optimizer.global_step.asnumpy()).reshape(-1)[0])
            lr_value = schedule.value(opt_step)
            begin = time.perf_counter()
            loss, norm, finite = step_fn(*[Tensor(batch[key]) for key in BATCH_KEYS])
            loss = float(loss.asnumpy())
            elapsed = time.perf_counter() - begin
            if first_step_s is None:
                first_step_s = elapsed
            else:
                times.append(elapsed)
            done = step + 1
            losses.append(loss)
            rate = batches.global_batch / elapsed
            if log is not None:
                log.add(step=done, epoch=batches.epoch_of(step), loss=loss, lr=float(lr_value),
                        grad_norm=float(norm.asnumpy()),
                        loss_scale=float(scaler.scale_value.asnumpy()) if scaler is not None else 1.0,
                        skipped=int(not bool(finite.asnumpy())), step_time_s=elapsed, samples_per_s=rate)
            progress.update(loss, lr_value, rate)
            if done % runner.save_steps == 0 or done == runner.max_steps:
                save(done, loss)
    except KeyboardInterrupt:
        if done > start and done not in manager.steps():
            save(done, losses[-1])
            progress.write(f"interrupted: checkpoint of step {done} written; continue with --resume")
        raise
    finally:
        stop_signal.restore()
        progress.close()
        if log is not None and log.rows:
            plot_loss(log.losses(), os.path.join(output_dir, PNG_NAME), resumed_at=log.resumed_at,
                      title=f"training loss ({os.path.basename(options.config)})")

    result = RunResult(output_dir, done, losses, trainable=summary.trainable, rank=rank, world_size=world,
                       first_step_s=first_step_s, model=model)
    if times:
        result.step_time_s = float(np.median(times))
        result.samples_per_s = batches.global_batch / result.step_time_s
        if not options.quiet:  # every rank, in its own log (run_singlenode.sh: output/log/rank_<r>/run.log)
            print(f"{TIMING_PREFIX} rank {rank} of {world}: median step {result.step_time_s * 1e3:.2f} ms over "
                  f"{len(times)} steps after the first ({first_step_s:.2f} s); {result.samples_per_s:.2f} "
                  f"samples/s at global batch {batches.global_batch}", flush=True)
    if done < runner.max_steps:
        _say(options, rank, f"stopped after step {done} of {runner.max_steps} (--stop_at_step); "
                            "continue with --resume")
        return result
    if rank == 0:
        final = os.path.join(output_dir, LORA_FILE)
        result.lora_checkpoint = write_atomic(final, functools.partial(
            shutil.copyfile, os.path.join(manager.step_dir(done), LORA_FILE)))
        with open(os.path.join(output_dir, SUMMARY_NAME), "w", encoding="utf-8") as f:
            json.dump({"config": os.path.abspath(options.config), "dataset": data.path, "steps": done,
                       "samples": len(data.samples), "global_batch": batches.global_batch,
                       "world_size": world, "trainable_parameters": summary.trainable,
                       "final_loss": losses[-1] if losses else None, "step_time_s": result.step_time_s,
                       "samples_per_s": result.samples_per_s, "lora_checkpoint": final}, f, indent=1)
        _say(options, rank, f"done: {done} steps, final loss {losses[-1]:.4f}" if losses else "done")
        _say(options, rank, f"LoRA checkpoint: {final}\nlog: {os.path.join(output_dir, CSV_NAME)}, "
                            f"curve: {os.path.join(output_dir, PNG_NAME)}")
        if options.merge:
            result.merged_yaml = merge_and_save(model, options.config, output_dir)
            _say(options, rank, f"merged model: {result.merged_yaml}")
    return result


__all__ = ["RunOptions", "RunResult", "finetune", "merge_only", "merge_and_save", "write_inference_yaml",
           "init_data_parallel", "CSV_NAME", "PNG_NAME", "MERGED_YAML", "TIMING_PREFIX"]
