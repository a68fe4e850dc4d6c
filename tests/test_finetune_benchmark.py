"""`benchmarks/run.py --quick --only finetune_step` prints the train-step rows, in-process and one process vs
two workers through run_singlenode.sh (no timing is asserted)."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS = ("train step, tiny VisualGLM, demo LoRA, batch 3", "train samples/s, tiny VisualGLM, demo LoRA, batch 3",
        "train step, GLM h256 x2, reference LoRA, batch 1", "train samples/s, GLM h256 x2, reference LoRA, batch 1")
DP_ROWS = tuple(f"train {what}, tiny VisualGLM, {who}, global batch 6" for what in ("step", "samples/s")
                for who in ("1 process (run_finetune.py)", "2 workers (run_singlenode.sh)"))
RATIO = "2 workers / 1 process train samples/s, global batch 6"


def test_finetune_step_section(tmp_path):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mindformers_output"))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "run.py"), "--quick", "--only",
                           "finetune_step"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 7 and cells[0] == "finetune_step":
            rows[cells[1]] = cells
    assert set(ROWS + DP_ROWS + (RATIO,)) <= set(rows), proc.stdout
    for name in ROWS + DP_ROWS + (RATIO,):
        assert float(rows[name][2]) > 0
    for name in DP_ROWS[:2]:  # the step times come with each rank's own timing line
        assert "own timing lines: rank 0 " in rows[name][6]
    assert "rank 1 " in rows[DP_ROWS[1]][6]
