"""Data parallel under msrun: two CPU workers running run_finetune.py end with identical weights on both
ranks, equal (fp32 tolerance) to one process training on the same global batch, with the same losses."""
import csv
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_TINY = os.path.join(REPO, "configs", "visualglm_tiny", "lora.yaml")
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


def test_two_msrun_workers_match_one_process(tmp_path):
    msrun = shutil.which("msrun") or os.path.join(os.path.dirname(sys.executable), "msrun")
    if not os.path.exists(msrun):
        pytest.skip("msrun (MindSpore's launcher) is not installed")
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "log"))
    common = ["--max_steps", str(STEPS), "--save_steps", "3", "--progress", "False"]
    two = subprocess.run([msrun, "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}", "--join=True", f"--log_dir={tmp_path / 'msrun_log'}",
                          os.path.join(REPO, "run_finetune.py"), "--config", LORA_TINY,
                          "--output_dir", str(tmp_path / "dp"), "--batch_size", "2"] + common,
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    logs = "".join((tmp_path / "msrun_log" / f"worker_{r}.log").read_text(errors="replace")[-2000:] for r in (0, 1)
                   if (tmp_path / "msrun_log" / f"worker_{r}.log").exists())
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:] + logs
    one = subprocess.run([sys.executable, os.path.join(REPO, "run_finetune.py"), "--config", LORA_TINY,
                          "--output_dir", str(tmp_path / "single"), "--batch_size", "4"] + common,
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr[-3000:]

    step = f"step_{STEPS:06d}"
    rank0 = weights(str(tmp_path / "dp" / "checkpoints" / "rank_0" / step / "lora.ckpt"))
    rank1 = weights(str(tmp_path / "dp" / "checkpoints" / "rank_1" / step / "lora.ckpt"))
    single = weights(str(tmp_path / "single" / "lora.ckpt"))
    assert set(rank0) == set(rank1) == set(single) and len(rank0) == 28
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)  # identical on both ranks
        np.testing.assert_allclose(rank0[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(rank0[n].any() for n in rank0 if n.endswith("lora_b"))  # it did train
    np.testing.assert_allclose(losses(tmp_path / "dp"), losses(tmp_path / "single"), rtol=1e-6)
