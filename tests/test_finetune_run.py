"""End to end: the tiny VisualGLM LoRA-finetuned on examples/finetune reproduces every training label under
greedy decoding (with the LoRA checkpoint, and merged into the base weights), only LoRA and the configured
projection changed, the run leaves its log/curve/checkpoints, and --resume continues the loss curve exactly."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import visual_mllm
from visual_mllm.finetune.evaluate import describe, evaluate_labels
from visual_mllm.finetune.lora import load_lora_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
LORA_TINY = os.path.join(REPO, "configs", "visualglm_tiny", "lora.yaml")
EXAMPLES = os.path.join(REPO, "examples", "finetune", "dataset.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo finetune (configs/visualglm_tiny/lora.yaml, 240 steps) run in this process."""
    import mindspore as ms

    from visual_mllm.finetune.trainer import RunOptions, finetune

    ms.set_context(mode=ms.GRAPH_MODE)
    out = tmp_path_factory.mktemp("finetune_tiny")
    result = finetune(RunOptions(config=LORA_TINY, output_dir=str(out), quiet=True, progress=False))
    return result


def assert_all_labels(model, processor, **kw):
    checks = evaluate_labels(model, processor, EXAMPLES, **kw)
    assert len(checks) == 9
    assert all(c.matches for c in checks), describe(checks)


def test_only_lora_and_the_configured_projection_changed(trained):
    base, _ = visual_mllm.load_from_yaml(TINY)
    before = {p.name: p.asnumpy() for p in base.get_parameters()}
    after = {p.name: p.asnumpy() for p in trained.model.get_parameters()}
    lora = {n for n in after if "mindpet_delta_lora" in n}
    assert set(after) == set(before) | lora and len(lora) == 2 * 13  # 4 Dense x 3 layers + lm_head
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == {"image_encoder.projection.weight", "image_encoder.projection.bias"}
    assert all(after[n].any() for n in lora if n.endswith("lora_b"))  # every LoRA B moved off zero
    assert trained.trainable == sum(after[n].size for n in lora) + 32 * 64 + 64


def test_lora_checkpoint_reproduces_every_training_label(trained):
    model, processor = visual_mllm.load_from_yaml(TINY)
    load_lora_checkpoint(model, trained.lora_checkpoint)
    assert_all_labels(model, processor, use_past=True)


def test_merged_model_reproduces_every_training_label(trained, tmp_path):
    from visual_mllm.finetune.trainer import merge_and_save

    model, _ = visual_mllm.load_from_yaml(TINY)
    load_lora_checkpoint(model, trained.lora_checkpoint)
    merged_yaml = merge_and_save(model, LORA_TINY, str(tmp_path))
    merged, processor = visual_mllm.load_from_yaml(merged_yaml)  # split checkpoints, loaded strictly
    assert not any("lora" in p.name for p in merged.get_parameters())
    assert_all_labels(merged, processor, use_past=False)


def test_run_outputs(trained):
    out = trained.output_dir
    with open(os.path.join(out, "train_log.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 241))
    assert set(rows[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "skipped", "step_time_s",
                            "samples_per_s"}
    losses = [float(r["loss"]) for r in rows]
    assert losses == trained.losses and losses[-1] < 0.05 < losses[0]
    assert float(rows[0]["lr"]) == 0.0 and float(rows[10]["lr"]) == pytest.approx(5e-3, rel=1e-3)
    with Image.open(os.path.join(out, "loss_curve.png")) as img:
        assert img.size == (800, 480)
    steps = sorted(os.listdir(os.path.join(out, "checkpoints", "rank_0")))
    assert steps == ["step_000180", "step_000240"]  # keep_checkpoints: 2, nothing half-written left
    with open(os.path.join(out, "lora.ckpt"), "rb") as a, \
            open(os.path.join(out, "checkpoints", "rank_0", "step_000240", "lora.ckpt"), "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["steps"] == 240 and summary["samples"] == 9 and summary["trainable_parameters"] == trained.trainable


def run_cli(args, cwd):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(cwd, "log"))
    return subprocess.run([sys.executable, os.path.join(REPO, "run_finetune.py"), "--config", LORA_TINY,
                           "--progress", "False"] + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)


def test_resume_after_a_stop_continues_the_loss_curve_exactly(trained, tmp_path):
    out = str(tmp_path / "run")
    first = run_cli(["--output_dir", out, "--save_steps", "3", "--stop_at_step", "7"], str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after step 7 of 240" in first.stdout
    assert sorted(os.listdir(os.path.join(out, "checkpoints", "rank_0"))) == ["step_000003", "step_000006"]
    assert not os.path.exists(os.path.join(out, "lora.ckpt"))  # an interrupted run has no final checkpoint
    second = run_cli(["--output_dir", out, "--save_steps", "3", "--resume", "--stop_at_step", "12"], str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoints/rank_0/step_000006 (step 6 of 240)" in second.stdout
    with open(os.path.join(out, "train_log.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))  # step 7 was redone, once in the log
    resumed = [float(r["loss"]) for r in rows]
    assert resumed == trained.losses[:12]  # bit for bit the uninterrupted run
    from visual_mllm.finetune.checkpoints import ResumeError, restore

    expect = {"seed": 1234, "global_batch": 2, "num_samples": 9, "max_steps": 240}  # another batch size
    with pytest.raises(ResumeError, match="global_batch: checkpoint 3, this run 2"):
        restore(os.path.join(out, "checkpoints", "rank_0", "step_000012"), None, None, None, expect)


def test_packaged_demo_checkpoint_reproduces_every_label():
    from visual_mllm.finetune.demo import PACKAGED_DEMO_LORA

    if not os.path.isfile(PACKAGED_DEMO_LORA):
        pytest.skip("no packaged demo checkpoint (build it with examples/finetune/build_demo_model.py --install)")
    model, processor = visual_mllm.load_from_yaml(TINY)
    load_lora_checkpoint(model, PACKAGED_DEMO_LORA)
    assert_all_labels(model, processor)


def test_merge_command_and_run_infer_with_the_merged_yaml(tmp_path):
    from visual_mllm.finetune.demo import PACKAGED_DEMO_LORA

    if not os.path.isfile(PACKAGED_DEMO_LORA):
        pytest.skip("no packaged demo checkpoint")
    merged = run_cli(["--merge", "--lora_checkpoint", PACKAGED_DEMO_LORA, "--output_dir", str(tmp_path)],
                     str(tmp_path))
    assert merged.returncode == 0, merged.stderr[-3000:]
    yaml_path = tmp_path / "merged" / "run_merged.yaml"
    assert yaml_path.is_file()
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "log"))
    infer = subprocess.run([sys.executable, os.path.join(REPO, "run_infer.py"), "--config", str(yaml_path),
                            "--image_path", os.path.join(REPO, "examples", "images", "coffee.png"),
                            "--prompt", "杯子里是什么？", "--stream", "False"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert "杯子里是一杯浓缩咖啡。" in infer.stdout


def test_fp16_mixed_precision_skips_overflowing_steps_and_lowers_the_loss_scale(tmp_path):
    """amp O2 with a loss scale far too high: the first steps overflow in fp16, are skipped (weights and the
    optimizer step unchanged) and halve the scale; once it fits, training proceeds."""
    import mindspore as ms

    from visual_mllm.finetune.reporting import read_log
    from visual_mllm.finetune.trainer import RunOptions, finetune

    ms.set_context(mode=ms.GRAPH_MODE)
    config = tmp_path / "fp16.yaml"
    config.write_text(f"base_config: {LORA_TINY}\nfinetune:\n  dataset: {{path: {EXAMPLES}}}\n"
                      "  runner: {amp_level: O2, loss_scale: {init: 1099511627776, factor: 2, window: 1000}}\n",
                      encoding="utf-8")
    result = finetune(RunOptions(config=str(config), output_dir=str(tmp_path / "out"), max_steps=30,
                                 save_steps=30, quiet=True, progress=False))
    rows = read_log(str(tmp_path / "out" / "train_log.csv"))
    skipped, scales = [r["skipped"] for r in rows], [r["loss_scale"] for r in rows]
    first_ok = skipped.index(0)
    assert first_ok >= 5 and all(skipped[:first_ok]) and sum(skipped) <= first_ok + 2 and len(rows) - sum(skipped) >= 5
    assert scales[0] == 2.0 ** 39  # logged after the step: halved once
    for k in range(1, len(rows)):  # halved on every overflow, unchanged otherwise (window 1000 never reached)
        assert scales[k] == (scales[k - 1] / 2 if skipped[k] else scales[k - 1])
    assert all(r["lr"] == 0.0 for r in rows[:first_ok + 1])  # the optimizer step did not advance while skipping
    assert rows[-1]["loss"] < rows[first_ok]["loss"]
    assert result.steps_done == 30 and os.path.isfile(result.lora_checkpoint)


def test_ctrl_c_writes_a_checkpoint_of_the_last_step(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "log"))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run_finetune.py"), "--config", LORA_TINY,
                             "--progress", "False", "--output_dir", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    log = out / "train_log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text(encoding="utf-8").splitlines()) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    with open(log, encoding="utf-8") as f:
        last = int(list(csv.DictReader(f))[-1]["step"])
    assert last < 240 and f"interrupted: checkpoint of step {last} written" in stderr
    assert os.path.isfile(out / "checkpoints" / "rank_0" / f"step_{last:06d}" / "lora.ckpt")
