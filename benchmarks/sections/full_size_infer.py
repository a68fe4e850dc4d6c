"""The real-size models on this machine: `run_infer.py` answering one image request in float16 storage and
in int8, as a user runs it (a child process whose memory is sampled from /proc).

VisualGLM-6B goes the whole way a user goes: a random SAT release (fp16, the shape table's 1012 keys, written
as `convert_full` writes it) is converted by `convert_weight.py` twice, as it is (float16) and with
`--quantize int8`, and each conversion answers. MiniGPT-4 (Vicuna-7B) and MiniGPT4Qwen (Qwen-7B-Chat) start
from random float16 MindSpore checkpoints of their real-size YAMLs (every parameter of the model, streamed
from one mapped pool as the SAT release is); int8 is then quantised as the checkpoint loads
(`run_infer.py --quantize int8`). Random weights answer nonsense, at the speed and in the memory of the
real ones.

Families: all three, or those named in VISUAL_MLLM_FULL_SIZE_FAMILIES (comma-separated). Each needs its
checkpoints' size in free disk (VisualGLM ~2.7x: release and both conversions) and ~20 GB of RAM.
--quick: the tiny VisualGLM of configs/visualglm_tiny the same way (the smoke test of this path).
"""
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import Row, Section, Settings, run_child
from benchmarks.sections.convert_full import nbytes, sat_entries, write_random_sat

TITLE = "Real-size models: run_infer.py in float16 storage and int8 (load time, peak RSS, first token, s/token)"
REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE = REPO_ROOT / "examples" / "images" / "chelsea.png"
SEQ_LENGTH = 512  # the context; the KV cache holds the next power of two >= prompt + answer (128 here)
NEW_TOKENS = 12  # the first decode step compiles its graph: part of "decode" (about a step's time here)
# family -> (real-size YAML, the tiny YAML whose special ids fit the packaged tokenizer, that tokenizer, question)
BLIP2_FAMILIES = {
    "minigpt4": (REPO_ROOT / "configs" / "minigpt4_vicuna_7b" / "run_minigpt4_vicuna_7b.yaml",
                 REPO_ROOT / "configs" / "minigpt4_tiny" / "run_minigpt4_tiny.yaml",
                 REPO_ROOT / "research" / "visual_mllm" / "assets" / "vicuna_tiny" / "tokenizer.model",
                 "Describe this image in detail."),
    "minigpt4qwen": (REPO_ROOT / "configs" / "minigpt4qwen_7b" / "run_minigpt4qwen_7b.yaml",
                     REPO_ROOT / "configs" / "minigpt4qwen_tiny" / "run_minigpt4qwen_tiny.yaml",
                     REPO_ROOT / "research" / "visual_mllm" / "assets" / "qwen_tiny" / "qwen.tiktoken",
                     "Describe this image in detail."),
}
FAMILY_ORDER = ("visualglm", "minigpt4", "minigpt4qwen")
# the memory-lean run: image encoding and prefill op by op, whose temporaries are freed (graphs keep ~2 GB)
LEAN, LEAN_FLAGS = "prefill op by op", ("--prefill_mode", "pynative")
POOL_CHUNK = 64 << 20
GB = 1e9


def chosen_families(quick):
    if quick:
        return ["visualglm"]
    names = os.environ.get("VISUAL_MLLM_FULL_SIZE_FAMILIES", ",".join(FAMILY_ORDER))
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = set(chosen) - set(FAMILY_ORDER)
    if unknown:
        raise ValueError(f"VISUAL_MLLM_FULL_SIZE_FAMILIES: unknown {sorted(unknown)} (of {', '.join(FAMILY_ORDER)})")
    return chosen


def checked(result, what):
    status, out, err, _, _ = result
    if status != 0:
        tail = (err.strip().splitlines() or out.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{what} exited {status}: {tail}")
    return result


def folder_bytes(folder, suffix=".ckpt"):
    return sum(path.stat().st_size for path in Path(folder).iterdir() if path.name.endswith(suffix))


def answer(yaml_path, work, label, prompt, extra=()):
    """Rows of one run_infer.py request: load time, VmHWM, image encoding, first token, s/token."""
    command = [sys.executable, str(REPO_ROOT / "run_infer.py"), "--config", str(yaml_path), "--image_path",
               str(IMAGE), "--prompt", prompt, "--do_sample", "False", "--max_new_tokens", str(NEW_TOKENS),
               "--seq_length", str(SEQ_LENGTH), "--timings", "--no_compile_cache", *extra]
    status, out, err, seconds, peak = run_child(command, work, f"infer_{label.replace(' ', '_')}")
    if status != 0:
        tail = (err.strip().splitlines() or ["(no output)"])[-1]
        return [Row(f"{label}: run_infer.py", None, "-", notes=f"exited {status}: {tail[-300:]}; peak RSS "
                                                                f"{peak.hwm / GB:.2f} GB before it ended")]
    loaded = re.search(r"model loaded in ([\d.]+) s", out)
    timing = re.search(r"image encoding ([\d.]+) ms, first token ([\d.]+) ms, ([\d.]+|-)( tokens/s)? after it "
                       r"\((\d+) new tokens", out)
    per_token = float(timing.group(3)) if timing and timing.group(3) != "-" else None
    return [
        Row(f"{label}: peak RSS (VmHWM)", peak.hwm / GB, "GB", notes=f"whole process; RssAnon peak {peak.rss_anon / GB:.2f} GB"),
        Row(f"{label}: model load", float(loaded.group(1)) if loaded else None, "s",
            notes="build + read every checkpoint (run_infer.py --timings)"),
        Row(f"{label}: image encoding", float(timing.group(1)) / 1e3 if timing else None, "s",
            notes="ViT + Q-Former + projection, first call (graph compile included unless op by op)"),
        Row(f"{label}: time to first token", float(timing.group(2)) / 1e3 if timing else None, "s",
            notes="prompt prefill with the image, first call (graph compile included)"),
        Row(f"{label}: decode", 1.0 / per_token if per_token else None, "s/token",
            notes=f"{timing.group(5) if timing else '?'} new tokens, greedy, KV cache sized to the request"),
        Row(f"{label}: run_infer.py wall time", seconds, "s", notes="imports, load, compile, answer"),
    ]


def visualglm_rows(work, quick):
    """VisualGLM: random SAT release -> convert_weight.py (float16; --quantize int8) -> run_infer.py each."""
    config, entries, _ = sat_entries(quick)
    total = sum(nbytes(shape, dtype) for _, shape, dtype in entries)
    free = shutil.disk_usage(work).free
    if free < 2.9 * total:
        raise OSError(f"{work}: {free / GB:.1f} GB free, VisualGLM needs {2.9 * total / GB:.1f} GB")
    write_random_sat(work / "visualglm-6b", entries, config)
    rows = []
    for label, extra in (("float16", ()), ("int8", ("--quantize", "int8"))):
        out = work / f"ms_{label}"
        result = checked(run_child([sys.executable, str(REPO_ROOT / "convert_weight.py"), "--torch_path",
                                    str(work / "visualglm-6b"), "--output_dir", str(out), *extra], work,
                                   f"convert_{label}"), f"convert_weight.py {' '.join(extra)}")
        rows.append(Row(f"VisualGLM {label}: convert_weight.py {' '.join(extra)}".rstrip(), result[3], "s",
                        notes=f"{total / GB:.2f} GB fp16 SAT -> {folder_bytes(out) / GB:.2f} GB of .ckpt (the "
                              f"embedding twice); peak RssAnon {result[4].rss_anon / GB:.2f} GB"))
    shutil.rmtree(work / "visualglm-6b")  # the release is not needed to answer
    for label in ("float16", "int8"):
        rows += answer(work / f"ms_{label}" / "run_visualglm.yaml", work, f"VisualGLM {label}", "描述这张图片。")
    if not quick:  # (the smoke run: the flag itself is tested in tests/test_cli.py)
        rows += answer(work / "ms_int8" / "run_visualglm.yaml", work, f"VisualGLM int8 {LEAN}", "描述这张图片。",
                       LEAN_FLAGS)
    for label in ("float16", "int8"):
        shutil.rmtree(work / f"ms_{label}")
    return rows, f"VisualGLM{' tiny' if quick else '-6B'}: {len(entries)} SAT tensors, {total / GB:.2f} GB fp16"


def pool_tensors(pool, shapes):
    """{name: float16 torch tensor} mapped copy-on-write from the pool file (see convert_full)."""
    import torch

    return {name: torch.from_file(str(pool), shared=False, size=math.prod(shape), dtype=torch.float16).reshape(shape)
            for name, shape in shapes.items()}


def special_ids(config):
    """The special ids of a model config section: the image placeholder and the LLM's *_token_id."""
    ids = {"image_placeholder": config["image_placeholder"]} if "image_placeholder" in config else {}
    return ids, {key: value for key, value in config["llm_config"].items() if key.endswith("_token_id")}


def write_random_mindspore(folder, family_name, yaml_path, ids_yaml, vocab_file):
    """Random float16 split checkpoints of a real-size run YAML and the YAML that loads them (special ids
    from `ids_yaml`, whose tokenizer is `vocab_file`); returns (YAML path, parameters, bytes)."""
    from visual_mllm import families
    from visual_mllm.convert.job import model_parameters, part_files
    from visual_mllm.convert.writers import CkptWriter, OutputFiles
    from visual_mllm.models.weights import SPLIT_PARTS
    from visual_mllm.registry import read_run_config
    from mindformers.models.build_config import build_model_config

    family = families.get(family_name)
    no_files = {"vit_checkpoint": None, "qformer_checkpoint": None, "llm_checkpoint": None}
    config = build_model_config(read_run_config(str(yaml_path), no_files).model.model_config)
    shapes, _ = model_parameters(family.model_class, config)
    folder.mkdir(parents=True)
    pool = folder / "random_pool.bin"
    largest = max(math.prod(shape) for shape in shapes.values()) * 2
    rng = np.random.default_rng(0)
    with open(pool, "wb") as f:
        for start in range(0, largest, POOL_CHUNK):
            f.write((rng.standard_normal(min(POOL_CHUNK, largest - start) // 2, dtype=np.float32) * 0.02)
                    .astype(np.float16).tobytes())
    names = part_files(family.model_class)
    data = yaml.safe_load(Path(yaml_path).read_text())
    model_ids, llm_ids = special_ids(yaml.safe_load(Path(ids_yaml).read_text())["model"]["model_config"])
    data["model"]["model_config"].update(model_ids)
    data["model"]["model_config"]["llm_config"].update(llm_ids)
    with OutputFiles() as outputs:
        for part, prefixes in SPLIT_PARTS.items():
            part_shapes = {name: shape for name, shape in shapes.items() if name.startswith(prefixes)}
            tensors = pool_tensors(pool, part_shapes)
            path = folder / (names[part] + ".ckpt")
            writer = outputs.writer(CkptWriter, str(path), [(name, t.to("meta")) for name, t in tensors.items()])
            for name, tensor in tensors.items():
                writer.add(name, tensor)
            writer.close()
            data["model"]["model_config"][f"{part}_checkpoint"] = str(path)
            del tensors
        data["processor"]["tokenizer"]["vocab_file"] = str(vocab_file)
        outputs.write_text(str(folder / "run.yaml"), yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        outputs.commit()
    pool.unlink()
    return folder / "run.yaml", sum(math.prod(s) for s in shapes.values()), folder_bytes(folder)


def blip2_rows(work, family_name):
    yaml_path, ids_yaml, vocab, prompt = BLIP2_FAMILIES[family_name]
    start = time.perf_counter()
    run_yaml, params, written = write_random_mindspore(work / family_name, family_name, yaml_path, ids_yaml, vocab)
    label = {"minigpt4": "MiniGPT-4 (Vicuna-7B)", "minigpt4qwen": "MiniGPT4Qwen (Qwen-7B)"}[family_name]
    rows = [Row(f"{label}: write random float16 checkpoints", time.perf_counter() - start, "s",
                notes=f"{params / 1e9:.2f} B parameters, {written / GB:.2f} GB (not part of a user's run)")]
    rows += answer(run_yaml, work, f"{label} float16", prompt)
    rows += answer(run_yaml, work, f"{label} int8", prompt, ("--quantize", "int8"))
    rows += answer(run_yaml, work, f"{label} int8 {LEAN}", prompt, ("--quantize", "int8", *LEAN_FLAGS))
    shutil.rmtree(work / family_name)
    return rows, f"{label}: {params / 1e9:.2f} B parameters from {yaml_path.relative_to(REPO_ROOT)}"


def run(settings: Settings) -> Section:
    section = Section("full_size_infer")
    work = Path(tempfile.mkdtemp(prefix="visual_mllm_full_size_"))
    try:
        for name in chosen_families(settings.quick):
            rows, what = visualglm_rows(work, settings.quick) if name == "visualglm" else blip2_rows(work, name)
            section.rows += rows
            section.config.append(f"- full_size_infer: {what}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section.config.append(f"- full_size_infer: one image request ({IMAGE.name}), greedy, {NEW_TOKENS} new tokens, "
                          f"--seq_length {SEQ_LENGTH}, CPU, weights in float16 storage with float32 compute")
    section.notes = [
        "Peak RSS is VmHWM of the run_infer.py process (sampled every 50 ms): weights, the KV cache, MindSpore's "
        "compiled graphs and one float32 copy of the largest weight while it is used.",
        "Image encoding and first token include compiling their graphs (this is one request per process).",
    ]
    return section
