"""The README's demo as a user runs it (`python run_infer.py`, a child process): wall time without the compile
cache, and with it on its first run (an empty cache: compiles and saves the graphs) and second run (loads
them). The same under --quick: the demo is already tiny.
"""
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Row, Section, Settings, run_child

TITLE = "The demo (run_infer.py, no arguments): wall time without and with MindSpore's compile cache"
REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = (("compile cache off", ["--no_compile_cache"]), ("compile cache, first run", []),
        ("compile cache, second run", []))


def run(settings: Settings) -> Section:  # noqa: ARG001  (nothing to shrink under --quick)
    section = Section("demo_run")
    work = Path(tempfile.mkdtemp(prefix="visual_mllm_demo_bench_"))
    try:
        seconds = {}
        for number, (label, extra) in enumerate(RUNS):
            status, out, err, seconds[label], _ = run_child(
                [sys.executable, str(REPO_ROOT / "run_infer.py"), *extra], work, f"demo_{number}",
                env={"VISUAL_MLLM_CACHE": str(work / "cache")})
            answered = status == 0 and "answer:" in out
            section.rows.append(Row(f"demo wall time, {label}", seconds[label] if answered else None, "s",
                                    notes="imports, model build, compile or cache load, answer" if answered
                                    else f"exited {status}: {(err.strip().splitlines() or ['?'])[-1][-200:]}"))
        first, second = seconds["compile cache, first run"], seconds["compile cache, second run"]
        section.rows.append(Row("demo first / second run", first / second, "x", notes="with the compile cache"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return section
