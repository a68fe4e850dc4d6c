"""Weight conversion at full size: a random VisualGLM-6B SAT checkpoint (fp16, ~15.6 GB) through
`convert_weight.py`, as a user runs it, in a child process whose memory is sampled from /proc.

The checkpoint has the release's 1012 keys and shapes (`../shared/fixtures/shapes/visualglm_full_shapes.tsv`)
and sizes (configs/visualglm_6b). It is written without ever holding it in RAM: one pool file of random
fp16 values as large as the largest tensor is mapped once per tensor (torch.from_file, copy-on-write),
and torch.save streams each mapping into the zip. Every tensor therefore starts with the same values;
conversion cost does not depend on them. The special token ids in its model_config.json are those of
the tokenizer shipped with visual_mllm, so that the conversion runs without --tokenizer (no real
ice_text.model here); nothing else depends on them.

--quick: the tiny VisualGLM of configs/visualglm_tiny, keys from the SAT key map (no fixture needed).
"""
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from benchmarks.common import AnonPeak, Row, Section, Settings, run_child

TITLE = "convert_weight.py on a full-size random VisualGLM SAT checkpoint (fp16): time, MB/s, peak memory"
REPO_ROOT = Path(__file__).resolve().parents[2]
FULL_YAML = REPO_ROOT / "configs" / "visualglm_6b" / "run_visualglm_6b.yaml"
QUICK_YAML = REPO_ROOT / "configs" / "visualglm_tiny" / "run_visualglm_tiny.yaml"
POOL_CHUNK = 64 << 20


def fixtures_root():
    return Path(os.environ.get("VISUAL_MLLM_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def model_config(yaml_path):
    """The VisualGLMConfig of a run YAML, with the packaged tokenizer's special ids."""
    from mindformers.models.build_config import build_model_config
    from visual_mllm.registry import read_run_config
    from visual_mllm.tokenizers.chatglm import ChatGLMTokenizer

    no_files = {"vit_checkpoint": None, "qformer_checkpoint": None, "llm_checkpoint": None}
    config = build_model_config(read_run_config(yaml_path, no_files).model.model_config)
    tokenizer = ChatGLMTokenizer()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id"):
        setattr(config.llm_config, name, getattr(tokenizer, name))
    return config


def table_entries(path):
    """[(key, shape, torch dtype)] of a shape table."""
    import torch

    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                key, shape, dtype = line.rstrip("\n").split("\t")[:3]
                entries.append((key, tuple(json.loads(shape)), getattr(torch, dtype)))
    return entries


def map_entries(config):
    """[(SAT key, shape, float16)] of a config, from the SAT key map run backwards on the model's shapes."""
    import torch
    from visual_mllm.convert import visualglm_sat
    from visual_mllm.convert.job import model_parameter_shapes
    from visual_mllm.convert.keymap import invert, plan
    from visual_mllm.convert.readers import Source, SourceTensor
    from visual_mllm.models.visualglm import VisualGLMForConditionalGeneration

    shapes = model_parameter_shapes(VisualGLMForConditionalGeneration, config)
    model = Source({name: SourceTensor("model", shape, torch.float16, None) for name, shape in shapes.items()},
                   [], "model")
    targets = plan(model, invert(visualglm_sat.sat_rules(config)), (), None, "SAT keys").targets
    return [(key, tuple(meta.shape), torch.float16) for key, meta in targets.items()]


def nbytes(shape, dtype):
    return math.prod(shape) * dtype.itemsize


def write_random_sat(folder, entries, config):
    """A SAT release folder with random fp16 tensors for `entries`, streamed (see the module docstring)."""
    import torch
    from visual_mllm.convert.visualglm_sat import sat_model_config

    if {dtype for _, _, dtype in entries} != {torch.float16}:
        raise ValueError("the random checkpoint is fp16 only")
    (folder / "1").mkdir(parents=True)
    (folder / "latest").write_text("1")
    (folder / "model_config.json").write_text(json.dumps(sat_model_config(config), indent=2))
    pool = folder / "random_pool.bin"
    largest = max(nbytes(shape, dtype) for _, shape, dtype in entries)
    rng = np.random.default_rng(0)
    with open(pool, "wb") as f:
        for start in range(0, largest, POOL_CHUNK):
            count = min(POOL_CHUNK, largest - start) // 2
            f.write((rng.standard_normal(count, dtype=np.float32) * 0.02).astype(np.float16).tobytes())
    state = OrderedDict((key, torch.from_file(str(pool), shared=False, size=math.prod(shape), dtype=dtype).reshape(shape))
                        for key, shape, dtype in entries)
    torch.save({"module": state}, folder / "1" / "mp_rank_00_model_states.pt")
    del state
    pool.unlink()
    return folder / "1" / "mp_rank_00_model_states.pt", largest


def sat_entries(quick):
    """(config, [(SAT key, shape, dtype)], what) of the random SAT release: VisualGLM-6B's shape table, or
    with `quick` the tiny VisualGLM's keys from the SAT key map (no fixture needed)."""
    if quick:
        config = model_config(QUICK_YAML)
        return config, map_entries(config), "tiny VisualGLM (configs/visualglm_tiny), keys from the SAT key map"
    table = fixtures_root() / "shapes" / "visualglm_full_shapes.tsv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} not found (set VISUAL_MLLM_FIXTURES to the shared/fixtures folder)")
    return (model_config(FULL_YAML), table_entries(table),
            f"VisualGLM-6B sizes (configs/visualglm_6b), keys and shapes from {table.name}")


def run(settings: Settings) -> Section:
    section = Section("convert_full")
    config, entries, what = sat_entries(settings.quick)
    total = sum(nbytes(shape, dtype) for _, shape, dtype in entries)
    work = Path(tempfile.mkdtemp(prefix="visual_mllm_convert_bench_"))
    try:
        free = shutil.disk_usage(work).free
        if free < 2.2 * total:
            raise OSError(f"{work}: {free / 1e9:.1f} GB free, the benchmark needs {2.2 * total / 1e9:.1f} GB")
        own = AnonPeak(os.getpid())
        start = time.perf_counter()
        pt, largest = write_random_sat(work / "visualglm-6b", entries, config)
        write_s = time.perf_counter() - start
        own.stop()
        command = [sys.executable, str(REPO_ROOT / "convert_weight.py"), "--torch_path", str(work / "visualglm-6b"),
                   "--output_dir", str(work / "out")]
        status, stdout, stderr, convert_s, peak = run_child(command, work, "convert")
        if status != 0:
            raise RuntimeError(f"convert_weight.py exited {status}: {stderr[-2000:]}")
        own_timer = re.search(r"in ([\d.]+) s \((\d+) MB/s\)", stdout)
        written = sum(p.stat().st_size for p in (work / "out").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = 1e9
    section.config = [f"- convert_full: {what}; {len(entries)} tensors, {total / gb:.2f} GB fp16; "
                      f"largest tensor {largest / gb:.2f} GB"]
    section.rows = [
        Row("write random SAT checkpoint", write_s, "s",
            notes=f"{total / gb:.2f} GB streamed by torch.save from a mapped pool; peak RssAnon of the writer "
                  f"{own.rss_anon / gb:.2f} GB"),
        Row("convert_weight.py wall time", convert_s, "s",
            notes=f"child process, imports included; wrote {written / gb:.2f} GB (4 checkpoints, YAML, manifest)"),
        Row("conversion throughput (wall time)", total / 1e6 / convert_s, "MB/s", notes="source bytes / wall time"),
        Row("conversion throughput (converter's own timer)", float(own_timer.group(2)) if own_timer else None,
            "MB/s", notes=f"from the converter's summary line: {own_timer.group(0) if own_timer else 'not found'}"),
        Row("peak RssAnon of convert_weight.py", peak.rss_anon / gb, "GB",
            notes=f"sampled every 50 ms; target < 4 GB + largest tensor = {(4 * gb + largest) / gb:.2f} GB"),
        Row("peak RSS (VmHWM) of convert_weight.py", peak.hwm / gb, "GB",
            notes="resident set including the file-backed pages of the mapped source (reclaimable)"),
    ]
    section.notes = [
        "The source was written just before the conversion, so part of it may still be in the page cache: "
        "the read side can be faster than from a cold disk.",
        "The converter hashes its source (sha256, for manifest.json) on a second thread while converting.",
    ]
    return section
