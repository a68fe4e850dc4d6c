"""`benchmarks/run.py --quick` runs end to end and prints its markdown table (no timing is asserted)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = REPO_ROOT / "benchmarks" / "run.py"
SECTIONS = ("llm_decode", "image_encoding", "chat_inference", "export_lite", "convert_full", "finetune_step",
            "precision_decode", "full_size_infer", "demo_run", "serving")

CONTEXTS = (128, 512)
EXPECTED_ROWS = (
    [f"{fw} prefill, seq {n}" for fw in ("MS", "PT") for n in CONTEXTS]
    + [f"{fw} decode with KV cache, ctx {n}" for fw in ("MS", "PT") for n in CONTEXTS]
    + [f"MS decode without cache, ctx {n}" for n in CONTEXTS]
    + [f"MS decode with KV cache, ctx 128, {slots}-slot cache" for slots in (128, 2048)]
    + [f"MS GLM decode with KV cache, ctx {n}" for n in CONTEXTS]
    + ["memcpy bandwidth, 1 thread", "LLaMA fp32 weight-bandwidth bound", "GLM fp32 weight-bandwidth bound"]
    + [f"MS / PT prefill, seq {n}" for n in CONTEXTS]
    + [f"MS / PT decode, ctx {n}" for n in CONTEXTS]
    + [f"MS decode / LLaMA bound, ctx {n}" for n in CONTEXTS]
    + [f"PT decode / LLaMA bound, ctx {n}" for n in CONTEXTS]
    + [f"MS GLM decode / GLM bound, ctx {n}" for n in CONTEXTS]
    + [f"MS no-cache / cached decode, ctx {n}" for n in CONTEXTS]
)
IMAGE_BATCHES = (1, 4)
IMAGE_ROWS = (
    [name for b in IMAGE_BATCHES for name in (f"MS ViT + ln_vision, batch {b}", f"PT Blip2VisionModel, batch {b}")]
    + [f"MS / PT image encoding, batch {b}" for b in IMAGE_BATCHES]
)
CHAT_BATCHES = (1, 4)
CHAT_ROWS = (
    [f"{fw} {what}, batch {b}" for b in CHAT_BATCHES for fw in ("MS", "PT")
     for what in ("image encoding", "time to first token", "decode")]
    + [f"{ratio}, batch {b}" for b in CHAT_BATCHES for ratio in
       ("MS / PT image encoding", "MS / PT time to first token", "PT / MS decode tokens/s")]
)
DEMO_ROWS = ["demo wall time, compile cache off", "demo wall time, compile cache, first run",
             "demo wall time, compile cache, second run", "demo first / second run"]
SERVING_ROWS = (["sequential Python API: requests/s", "sequential Python API: tokens/s"]
                + [f"server, {c} clients: {what}" for c in (1, 4, 8) for what in
                   ("requests/s", "tokens/s", "time to first token p50", "time to first token p95")]
                + [f"server, {c} clients / sequential: requests/s" for c in (1, 4, 8)])
FULL_SIZE_ROWS = [f"VisualGLM {dtype}: {what}" for dtype in ("float16", "int8")
                  for what in ("peak RSS (VmHWM)", "model load", "time to first token", "decode")]


def table_rows(text, section="llm_decode"):
    """{benchmark name: cells} of the markdown table's rows of one section."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 7 and cells[0] == section:
            rows[cells[1]] = cells
    return rows


def test_quick_benchmark_prints_the_table(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mindformers_output"))
    report = tmp_path / "report.md"
    # every section but finetune_step, which tests/test_finetune_benchmark.py runs on its own
    sections = [name for name in SECTIONS if name != "finetune_step"]
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--only", *sections, "--output", str(report)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert "| Section | Benchmark | Median | Min | Unit | N | Notes |" in out
    assert "mindspore 2." in out and "threads:" in out  # the environment above the table
    rows = table_rows(out)
    missing = [name for name in EXPECTED_ROWS if name not in rows]
    assert not missing, f"rows missing from the table: {missing}\n{out}"
    for name in EXPECTED_ROWS:
        float(rows[name][2])  # every median is a number
    assert table_rows(report.read_text(encoding="utf-8")) == rows  # --output holds the same table
    for section, expected in (("image_encoding", IMAGE_ROWS), ("chat_inference", CHAT_ROWS),
                              ("full_size_infer", FULL_SIZE_ROWS), ("demo_run", DEMO_ROWS),
                              ("serving", SERVING_ROWS)):
        section_rows = table_rows(out, section)
        missing = [name for name in expected if name not in section_rows]
        assert not missing, f"{section} rows missing from the table: {missing}\n{out}"
        for name in expected:
            float(section_rows[name][2])


def test_list_and_unknown_section(tmp_path):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mindformers_output"))
    listed = subprocess.run([sys.executable, str(RUN), "--list"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    # the smoke test above runs every listed section (finetune_step in its own test)
    assert tuple(line.split(":")[0] for line in listed.stdout.splitlines()) == SECTIONS
    unknown = subprocess.run([sys.executable, str(RUN), "--only", "no_such_section"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
