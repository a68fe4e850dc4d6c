"""Data parallel through the launcher: `bash run_singlenode.sh "python run_finetune.py ..." ... "[0,2)" 2` starts
two CPU workers of MindSpore's dynamic cluster (plus its scheduler); they end with identical weights on
both ranks, equal (fp32 tolerance) to one process training on the same global batch, with the same
losses. A run_finetune.py that fails on one rank only (a dataset only that rank reads has a bad row)
makes the launch fail, naming that rank, and the other rank is stopped. Every family's tiny lora.yaml."""
import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "run_singlenode.sh")
EXAMPLES = os.path.join(REPO, "examples", "finetune", "dataset.json")
STEPS = 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(folder):
    with open(os.path.join(folder, "train_log.csv"), encoding="utf-8") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def weights(path):
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(path).items() if hasattr(v, "asnumpy")}


def family_names():
    from visual_mllm.families import FAMILIES

    return [f.name for f in FAMILIES]


def lora_tiny(family):
    return os.path.join(REPO, "configs", f"{family}_tiny", "lora.yaml")


def finetune_command(family, *args):
    return " ".join([sys.executable, os.path.join(REPO, "run_finetune.py"), "--config", lora_tiny(family),
                     "--progress", "False", "--threads", "1"] + [str(a) for a in args])


def launch(tmp_path, command, **env):
    """run_singlenode.sh on the CPU path (forced, also on an Ascend host): two workers + the scheduler."""
    env = dict(os.environ, VISUAL_MLLM_LAUNCHER="msrun", PYTHON=sys.executable, MASTER_PORT=str(free_port()),
               LOCAL_DEFAULT_PATH=str(tmp_path / "mindformers_log"), **env)
    # no rank table on CPU: the argument is a placeholder
    return subprocess.run(["bash", LAUNCHER, command, "no_rank_table_on_cpu", "[0,2)", "2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def rank_log(tmp_path, rank):
    path = tmp_path / "output" / "log" / f"rank_{rank}" / "run.log"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.parametrize("family", family_names())
def test_two_workers_through_run_singlenode_match_one_process(tmp_path, family):
    common = ["--max_steps", STEPS, "--save_steps", 3]
    two = launch(tmp_path, finetune_command(family, "--output_dir", tmp_path / "dp", "--batch_size", 2, *common))
    logs = "".join(f"\n--- rank_{r} ---\n" + rank_log(tmp_path, r)[-2000:] for r in (0, 1))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:] + logs
    one = subprocess.run(finetune_command(family, "--output_dir", tmp_path / "single", "--batch_size", 4, *common),
                         shell=True, cwd=tmp_path, env=dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "log")),
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr[-3000:]

    for rank in (0, 1):  # each worker joined the 2-rank group and reported its own step time in its log
        assert f"timing: rank {rank} of 2: median step" in rank_log(tmp_path, rank), rank_log(tmp_path, rank)[-2000:]
    summary = json.loads((tmp_path / "dp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and summary["steps"] == STEPS
    step = f"step_{STEPS:06d}"
    rank0 = weights(str(tmp_path / "dp" / "checkpoints" / "rank_0" / step / "lora.ckpt"))
    rank1 = weights(str(tmp_path / "dp" / "checkpoints" / "rank_1" / step / "lora.ckpt"))
    single = weights(str(tmp_path / "single" / "lora.ckpt"))
    assert set(rank0) == set(rank1) == set(single) and any(name.endswith("lora_b") for name in rank0)
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)  # identical on both ranks
        # the ranks' mean of half-batch gradients sums in another order than one full batch; Adam's
        # normalised step turns that fp32 rounding of near-zero gradients into at most ~1% of one step
        # (lr 5e-3 in the tiny lora.yaml files): 1e-4
        np.testing.assert_allclose(rank0[name], single[name], rtol=1e-5, atol=1e-4, err_msg=name)
    assert any(rank0[n].any() for n in rank0 if n.endswith("lora_b"))  # it did train
    np.testing.assert_allclose(losses(tmp_path / "dp"), losses(tmp_path / "single"), rtol=1e-6)


def test_run_finetune_failing_on_one_rank_fails_the_launch(tmp_path):
    """Rank 1 reads a dataset with a missing image (`--dataset data/rank_$RANK_ID.json`, expanded per rank):
    its validation error ends it with status 2; rank 0, whose data is fine, is stopped by the launcher
    (SIGTERM, then SIGKILL after STOP_GRACE_SECONDS if it is blocked waiting for rank 1)."""
    rows = json.loads(open(EXAMPLES, encoding="utf-8").read())
    for row in rows:
        if row.get("img"):
            row["img"] = os.path.normpath(os.path.join(os.path.dirname(EXAMPLES), row["img"]))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rank_0.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    rows[4]["img"] = str(tmp_path / "missing.png")
    (tmp_path / "data" / "rank_1.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")

    result = launch(tmp_path, finetune_command("visualglm", "--output_dir", tmp_path / "dp", "--batch_size", 2, "--max_steps",
                                               STEPS, "--dataset", "data/rank_$RANK_ID.json"),
                    STOP_GRACE_SECONDS="5")  # a launcher that never stopped rank 0 would hit launch()'s timeout
    assert result.returncode != 0
    assert "error: rank_1 exited with status 2, see output/log/rank_1/run.log" in result.stderr, result.stderr
    assert "row 4: image" in rank_log(tmp_path, 1) and "missing.png" in rank_log(tmp_path, 1)
    assert "data/rank_0.json (fewshot): 9 samples" in rank_log(tmp_path, 0)  # rank 0 itself was fine
    assert not (tmp_path / "dp" / "lora.ckpt").exists()
