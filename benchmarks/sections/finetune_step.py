"""LoRA finetuning train steps: the compiled step of `visual_mllm.finetune.train_step` (forward, loss,
gradients of the trainable parameters, clipping, AdamWeightDecay update), fp32, CPU.

In this process, two models: the tiny demo VisualGLM with the demo's LoRA layout
(configs/visualglm_tiny/lora.yaml, batch 3 of the examples/finetune rows, 128 tokens), and a mid-size GLM
with the VisualGLM-6B reference layout (LoRA rank 10 on query_key_value and dense of two layers) on one
320-token sample, the reference training length. Rows per model: step time (median) and samples/s.

Data parallel, one process vs two: `run_finetune.py` on the tiny demo at global batch 6, once as one
process and once as two workers of MindSpore's dynamic cluster started by `run_singlenode.sh` (3 rows per
rank, gradients averaged by AllReduce). The times are the runs' own: the per-step `step_time_s` of the
train_log.csv rank 0 writes (the ranks step in lockstep), after the warm-up steps, and each rank's
`timing:` line in output/log/rank_<r>/run.log. The two workers share the cores the one process has
(--threads: cores / 2 each; the launcher pins each to its half), so the ratio says whether splitting a
batch across processes pays on CPU.
"""
import csv
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ..common import Row, Section, Settings, time_call

TITLE = "LoRA finetune train step (forward + backward + AdamW), one process, fp32"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_LORA = os.path.join(REPO, "configs", "visualglm_tiny", "lora.yaml")
RUN_FINETUNE = os.path.join(REPO, "run_finetune.py")
LAUNCHER = os.path.join(REPO, "run_singlenode.sh")
DP_GLOBAL_BATCH = 6
DP_WORKERS = 2
TIMING_LINE = re.compile(r"timing: rank (\d+) of (\d+): median step ([0-9.]+) ms")


@dataclass
class Mid:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    seq: int


FULL = Mid(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, intermediate_size=4096, seq=320)
QUICK = Mid(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024, seq=320)


def build_step(config_path, lora, trainable, dataset_overrides=None, batch_size=1, **model_overrides):
    """(train step, batch tensors, global batch) for the finetune YAML with the given LoRA layout."""
    import mindspore as ms
    from mindspore import Tensor

    import visual_mllm
    from visual_mllm.finetune.config import load_finetune_config
    from visual_mllm.finetune.datasets import BATCH_KEYS, BatchSource, load_dataset
    from visual_mllm.finetune.lora import apply_lora
    from visual_mllm.finetune.lr_schedule import build_lr_schedule
    from visual_mllm.finetune.train_step import LossNet, TrainStep, build_optimizer

    _, cfg = load_finetune_config(config_path)
    for key, value in (dataset_overrides or {}).items():
        setattr(cfg.dataset, key, value)
    model, processor = visual_mllm.load_from_yaml(config_path, **model_overrides)
    data = load_dataset(cfg.dataset, processor)
    ms.set_seed(0)
    summary = apply_lora(model, lora, trainable)
    loss_net = LossNet(model)
    loss_net.set_train(True)
    optimizer = build_optimizer(model.trainable_params(), build_lr_schedule(cfg.lr_args(1000)))
    step = TrainStep(loss_net, optimizer, grad_clip=1.0)
    source = BatchSource(data, processor, model.llm.positions, cfg.dataset, batch_size, seed=0)
    batch = source.batch(0)
    return step, [Tensor(batch[k]) for k in BATCH_KEYS], batch_size, summary.trainable


class RunFailed(RuntimeError):
    pass


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path, chars=3000):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def finetune_run(workdir, workers, threads, steps):
    """Run run_finetune.py on the tiny demo at global batch DP_GLOBAL_BATCH, as one process or as `workers`
    workers through run_singlenode.sh; returns (per-step seconds from train_log.csv, {rank: median ms of
    its timing line}, wall seconds of the whole run)."""
    out = os.path.join(workdir, f"{workers}_process")
    args = [sys.executable, RUN_FINETUNE, "--config", TINY_LORA, "--output_dir", out, "--progress", "False",
            "--batch_size", str(DP_GLOBAL_BATCH // workers), "--max_steps", str(steps), "--save_steps", str(steps),
            "--threads", str(threads)]
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(workdir, "mindformers_log"))
    logs = {}
    begin = time.perf_counter()
    if workers == 1:
        proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800,
                              stdin=subprocess.DEVNULL)
        logs[0] = proc.stdout
        if proc.returncode != 0:
            raise RunFailed(f"run_finetune.py failed:\n{proc.stderr[-3000:]}")
    else:
        log_root = os.path.join(workdir, "log")
        env.update(VISUAL_MLLM_LAUNCHER="msrun", MASTER_PORT=str(_free_port()), LOG_ROOT=log_root,
                   PYTHON=sys.executable)
        proc = subprocess.run(["bash", LAUNCHER, " ".join(args), "no_rank_table_on_cpu", f"[0,{workers})",
                               str(workers)], cwd=workdir, env=env, capture_output=True, text=True, timeout=1800,
                              stdin=subprocess.DEVNULL)
        for rank in range(workers):
            logs[rank] = _tail(os.path.join(log_root, f"rank_{rank}", "run.log"), 100000)
        if proc.returncode != 0:
            raise RunFailed(f"run_singlenode.sh failed:\n{proc.stderr[-2000:]}\n"
                            + "\n".join(f"--- rank {r} ---\n{logs[r][-2000:]}" for r in logs))
    wall = time.perf_counter() - begin
    with open(os.path.join(out, "train_log.csv"), encoding="utf-8") as f:
        step_times = [float(row["step_time_s"]) for row in csv.DictReader(f)]
    reported = {}
    for rank, text in logs.items():
        for match in TIMING_LINE.finditer(text):
            if int(match.group(2)) == workers:
                reported[int(match.group(1))] = float(match.group(3))
    if sorted(reported) != list(range(workers)):
        raise RunFailed(f"no timing line from every rank (got ranks {sorted(reported)})")
    return step_times, reported, wall


def data_parallel_rows(settings: Settings):
    """The one process vs two workers rows (see the module docstring)."""
    steps, warmup = (8, 2) if settings.quick else (45, settings.warmup)
    one_threads = settings.threads
    worker_threads = max(1, settings.threads // DP_WORKERS)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_dp_") as workdir:
        for workers, threads in ((1, one_threads), (DP_WORKERS, worker_threads)):
            step_times, reported, wall = finetune_run(workdir, workers, threads, steps)
            timed = step_times[1 + warmup:]
            results[workers] = (statistics.median(timed), min(timed), len(timed), reported, wall, threads)
    labels = {1: "1 process (run_finetune.py)", DP_WORKERS: f"{DP_WORKERS} workers (run_singlenode.sh)"}
    for workers, (median_s, min_s, count, reported, wall, threads) in results.items():
        own = ", ".join(f"rank {r} {ms:.1f} ms" for r, ms in sorted(reported.items()))
        per_rank = DP_GLOBAL_BATCH // workers
        rows.append(Row(f"train step, tiny VisualGLM, {labels[workers]}, global batch {DP_GLOBAL_BATCH}",
                        median_s * 1e3, "ms", count,
                        f"{per_rank} rows/rank, {threads} thread(s)/process; steps {2 + warmup}-{steps} of "
                        f"train_log.csv; own timing lines: {own}; whole run {wall:.0f} s", min_s * 1e3))
    for workers, (median_s, *_rest) in results.items():
        rows.append(Row(f"train samples/s, tiny VisualGLM, {labels[workers]}, global batch {DP_GLOBAL_BATCH}",
                        DP_GLOBAL_BATCH / median_s, "samples/s", None, "global batch / median step time"))
    ratio = results[1][0] / results[DP_WORKERS][0]
    rows.append(Row(f"{DP_WORKERS} workers / 1 process train samples/s, global batch {DP_GLOBAL_BATCH}", ratio, "x",
                    None, f"> 1: data parallel is faster on these {settings.threads} thread(s) in all"))
    return rows


def run(settings: Settings) -> Section:
    from visual_mllm.finetune.config import load_finetune_config
    from visual_mllm.finetune.lora import LoraSettings

    section = Section("finetune_step")
    reps = settings.reps if not settings.quick else 3
    _, cfg = load_finetune_config(TINY_LORA)
    mid = QUICK if settings.quick else FULL
    reference = LoraSettings(rank=10, alpha=128.0, layers=[0, mid.num_layers - 1],
                             target_modules=["attention.query_key_value", "attention.dense"])
    cases = [
        ("tiny VisualGLM, demo LoRA", dict(lora=cfg.lora, trainable=cfg.trainable, batch_size=cfg.runner.batch_size),
         "configs/visualglm_tiny/lora.yaml layout; 128 tokens"),
        (f"GLM h{mid.hidden_size} x{mid.num_layers}, reference LoRA",
         dict(lora=reference, trainable=[], batch_size=1,
              dataset_overrides={"max_source_length": 64, "max_target_length": mid.seq - 64},
              llm_config={"vocab_size": mid.vocab_size, "hidden_size": mid.hidden_size,
                          "num_layers": mid.num_layers, "num_heads": mid.num_heads,
                          "intermediate_size": mid.intermediate_size, "max_position_embeddings": 2048}),
         f"rank 10 on qkv+dense of layers 0 and {mid.num_layers - 1}; vocab {mid.vocab_size}; {mid.seq} tokens"),
    ]
    for name, kwargs, note in cases:
        step, inputs, batch, trainable = build_step(TINY_LORA, **kwargs)

        def call(step=step, inputs=inputs):
            loss, _, _ = step(*inputs)
            loss.asnumpy()

        timing = time_call(call, reps, warmup=settings.warmup)
        section.rows.append(Row.timed(f"train step, {name}, batch {batch}", timing, "ms",
                                      f"{note}; {trainable:,} trainable; first call {timing.first_s:.1f} s"))
        section.rows.append(Row(f"train samples/s, {name}, batch {batch}", batch / timing.median_s, "samples/s",
                                None, "batch / median step time"))
    section.rows += data_parallel_rows(settings)
    section.notes.append("In-process rows: one process; the optimizer state and weights change every call (real "
                         "steps on the same batch).")
    section.notes.append(f"Data-parallel rows: run_finetune.py subprocesses on the tiny demo, global batch "
                         f"{DP_GLOBAL_BATCH}; the {DP_WORKERS} workers (MindSpore's dynamic cluster on CPU, started "
                         f"by run_singlenode.sh, each pinned to its share of the cores) get "
                         f"{max(1, settings.threads // DP_WORKERS)} CPU thread(s) each, the one process "
                         f"{settings.threads}: the same cores either way. Their subprocess CPU time is this run's "
                         "own, not 'other processes'.")
    return section
