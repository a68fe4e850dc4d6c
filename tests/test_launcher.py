"""run_singlenode.sh and the rank-table tools: generation, validation, per-rank processes, failures."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "run_singlenode.sh")


def write_hccn_conf(path, device_ids):
    path.write_text("".join(f"address_{d}=192.168.{d}.{d + 1}\nnetmask_{d}=255.255.255.0\n" for d in device_ids))
    return str(path)


def test_generate_with_two_digit_ids_from_hccn_conf(tmp_path, monkeypatch):
    from visual_mllm.distributed import rank_table

    monkeypatch.setenv("PATH", "/nonexistent")  # no hccn_tool: the hccn.conf fallback is used
    conf = write_hccn_conf(tmp_path / "hccn.conf", range(8, 16))
    path = rank_table.generate("[8,16)", str(tmp_path), server_ip="10.0.0.1", hccn_conf=conf)
    assert os.path.basename(path) == "hccl_8p_89101112131415_10.0.0.1.json"
    table = json.loads(open(path).read())
    devices = table["server_list"][0]["device"]
    assert [d["device_id"] for d in devices] == [str(i) for i in range(8, 16)]
    assert [d["rank_id"] for d in devices] == [str(i) for i in range(8)]
    assert devices[0]["device_ip"] == "192.168.8.9"
    rank_table.validate_rank_table_file(path, rank_size=8, device_range="[8,16)")


def good_table():
    from visual_mllm.distributed import rank_table

    return rank_table.build_rank_table([0, 1], "10.0.0.1", {0: "192.168.0.1", 1: "192.168.1.1"})


def break_table(kind):
    table = good_table()
    devices = table["server_list"][0]["device"]
    if kind == "int_value":
        devices[0]["rank_id"] = 0
    elif kind == "duplicate_device":
        devices[1]["device_id"] = "0"
    elif kind == "rank_gap":
        devices[1]["rank_id"] = "2"
    elif kind == "server_count":
        table["server_count"] = "2"
    elif kind == "bad_ip":
        devices[1]["device_ip"] = "192.168.1"
    elif kind == "status":
        table["status"] = "pending"
    return table


@pytest.mark.parametrize("kind,words", [("int_value", "must be strings"), ("duplicate_device", "listed twice"),
                                        ("rank_gap", "must be 0..1"), ("server_count", "server_count"),
                                        ("bad_ip", "not an IPv4"), ("status", "completed")])
def test_validator_explains_what_is_wrong(kind, words):
    from visual_mllm.distributed import rank_table

    with pytest.raises(rank_table.RankTableError, match=words):
        rank_table.validate_rank_table(break_table(kind))


def test_validate_cli_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0",\n "server_count": }')
    result = subprocess.run([sys.executable, "-m", "visual_mllm.cli.rank_table", "validate", str(bad)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.json" in result.stderr and "line 2" in result.stderr and "Traceback" not in result.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps(good_table()))
    result = subprocess.run([sys.executable, "-m", "visual_mllm.cli.rank_table", "validate", str(good),
                             "--rank_size", "4"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "RANK_SIZE 4" in result.stderr


def launch(tmp_path, command, launcher, device_range="[4,6)", rank_size="2", table=None):
    env = dict(os.environ, VISUAL_MLLM_LAUNCHER=launcher, PYTHON=sys.executable)
    if table is None:
        table = tmp_path / "table.json"
        t = good_table()
        for rank, device in enumerate(t["server_list"][0]["device"]):
            device["device_id"] = str(4 + rank)
        table.write_text(json.dumps(t))
    return subprocess.run(["bash", SCRIPT, command, str(table), device_range, rank_size], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def read_log(tmp_path, name):
    return (tmp_path / "output" / "log" / name / "run.log").read_text()


def test_ascend_path_exports_rank_variables_and_logs_per_rank(tmp_path):
    probe = f"{sys.executable} -c \"import os; print('env', os.environ['RANK_ID'], os.environ['DEVICE_ID'], " \
            "os.environ['RANK_SIZE'], os.path.basename(os.environ['RANK_TABLE_FILE']))\""
    result = launch(tmp_path, probe, "ascend")
    assert result.returncode == 0, result.stderr
    assert "env 0 4 2 table.json" in read_log(tmp_path, "rank_0")
    assert "env 1 5 2 table.json" in read_log(tmp_path, "rank_1")


def test_ascend_path_fails_when_one_rank_fails(tmp_path):
    failing = f"{sys.executable} -c \"import os, sys; sys.exit(7 if os.environ['RANK_ID'] == '1' else 0)\""
    result = launch(tmp_path, failing, "ascend")
    assert result.returncode != 0
    assert "rank_1 exited with status 7" in result.stderr and "rank_1/run.log" in result.stderr


def test_ascend_path_refuses_a_bad_rank_table(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps(break_table("rank_gap")))
    result = launch(tmp_path, "true", "ascend", device_range="[0,2)", table=table)
    assert result.returncode == 2 and "rank_id" in result.stderr


def test_bad_arguments(tmp_path):
    result = launch(tmp_path, "true", "msrun", device_range="[0,2)", rank_size="3")
    assert result.returncode == 2 and "holds 2 device(s) but RANK_SIZE is 3" in result.stderr
    result = launch(tmp_path, "true", "msrun", device_range="0-2")
    assert result.returncode == 2 and "[START,END)" in result.stderr


WORKER = """
import sys
import numpy as np
from mindspore import Tensor, ops
from mindspore.communication import get_group_size, get_rank, init

init()
rank = get_rank()
total = ops.AllReduce()(Tensor(np.array([rank + 1.0], np.float32))).asnumpy()[0]
print(f"rank {rank} of {get_group_size()}: sum {total}", flush=True)
sys.exit(5 if len(sys.argv) > 1 and int(sys.argv[1]) == rank else 0)
"""


def test_cpu_workers_form_one_cluster(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    result = launch(tmp_path, f"{sys.executable} worker.py", "msrun", device_range="[0,2)")
    assert result.returncode == 0, result.stderr
    assert "rank 0 of 2: sum 3.0" in read_log(tmp_path, "rank_0")
    assert "rank 1 of 2: sum 3.0" in read_log(tmp_path, "rank_1")
    assert "all 2 rank(s) finished" in result.stdout


AFFINITY = f"{sys.executable} -c \"import os; print('cores', sorted(os.sched_getaffinity(0)))\""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None,
                    reason="needs 2 usable cores and taskset")
def test_cpu_workers_get_their_share_of_the_cores(tmp_path, monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2
    result = launch(tmp_path, AFFINITY, "msrun", device_range="[0,2)")
    assert result.returncode == 0, result.stderr
    assert f"cores {cores[:half]}" in read_log(tmp_path, "rank_0")
    assert f"cores {cores[half:2 * half]}" in read_log(tmp_path, "rank_1")
    assert f"cores {cores}" in read_log(tmp_path, "scheduler")  # the scheduler is not pinned
    monkeypatch.setenv("BIND_CORES", "0")
    result = launch(tmp_path, AFFINITY, "msrun", device_range="[0,2)")
    assert result.returncode == 0, result.stderr
    assert f"cores {cores}" in read_log(tmp_path, "rank_0") and f"cores {cores}" in read_log(tmp_path, "rank_1")


def test_a_failing_cpu_worker_fails_the_launch(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    result = launch(tmp_path, f"{sys.executable} worker.py 1", "msrun", device_range="[0,2)")
    assert result.returncode != 0
    assert "rank_1 exited" in result.stderr
    assert "finished" not in result.stdout


STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # like a rank blocked in a collective whose peer died
with open(f"pid_{os.environ['RANK_ID']}.partial", "w") as f:
    f.write(str(os.getpid()))
os.replace(f"pid_{os.environ['RANK_ID']}.partial", f"pid_{os.environ['RANK_ID']}")
time.sleep(300)
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not running (reaped by init soon)
        return f.read().split(")")[-1].split()[0] != "Z"


def test_ranks_that_ignore_sigterm_are_killed_after_the_grace_period(tmp_path):
    """rank_1 fails; rank_0 ignores SIGTERM inside a compound command (bash stays its parent): the whole
    process group gets SIGKILL STOP_GRACE_SECONDS later, and the launch ends with rank_1's failure."""
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    command = (f'if [ "$RANK_ID" = 1 ]; then until [ -f pid_0 ]; do sleep 0.1; done; exit 3; fi; '
               f'{sys.executable} stubborn.py; echo after')  # rank 1 fails once rank 0 ignores SIGTERM
    env = dict(os.environ, VISUAL_MLLM_LAUNCHER="ascend", PYTHON=sys.executable, STOP_GRACE_SECONDS="2")
    table = tmp_path / "table.json"
    table.write_text(json.dumps(good_table()))
    result = subprocess.run(["bash", SCRIPT, command, str(table), "[0,2)", "2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "rank_1 exited with status 3" in result.stderr
    assert "still running 2s after SIGTERM, killing: rank_0" in result.stderr
    assert not alive(int((tmp_path / "pid_0").read_text()))
    assert "after" not in read_log(tmp_path, "rank_0")


def test_ctrl_c_stops_every_rank(tmp_path):
    import signal
    import time

    (tmp_path / "stubborn.py").write_text(STUBBORN.replace("signal.signal(signal.SIGTERM, signal.SIG_IGN)", ""))
    env = dict(os.environ, VISUAL_MLLM_LAUNCHER="ascend", PYTHON=sys.executable, STOP_GRACE_SECONDS="30")
    table = tmp_path / "table.json"
    table.write_text(json.dumps(good_table()))
    proc = subprocess.Popen(["bash", SCRIPT, f"{sys.executable} stubborn.py", str(table), "[0,2)", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not all((tmp_path / f"pid_{r}").is_file() for r in (0, 1)):
        time.sleep(0.1)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "SIGINT received, stopping every process" in stderr, stderr
    assert not any(alive(int((tmp_path / f"pid_{r}").read_text())) for r in (0, 1))
