"""What every conversion job shares, whatever the family: the checks before any tensor is read, the
split MindSpore output files, HF-style shards, and the manifest.

Split output (as the older MindFormers port wrote it, and as the YAML keys vit_checkpoint /
qformer_checkpoint / llm_checkpoint load it): `vit`, `qformer` (with ln_vision and the projection) and
`llm` follow models.weights.SPLIT_PARTS; `llm_embedding` repeats the LLM's word embedding table alone
(for Lite mode, where only the embedding runs in MindSpore); `llm_lora` holds LoRA weights kept apart.
"""
import datetime
import json
import os
import re
import sys
import time

from mindspore.nn.utils import no_init_parameters

from ..finetune.lora import LORA_PARAMS
from ..models.base import ProjectionMismatchError
from ..models.weights import SPLIT_PARTS
from .engine import execute, planned_outputs, tool_versions
from .readers import ConversionError
from .writers import CkptWriter, SafetensorsWriter, TorchBinWriter

PROJECTION_WEIGHT = "image_encoder.projection.weight"
LLM_EMBEDDING = "llm.word_embeddings.weight"
LORA_SUFFIXES = tuple("." + name for name in LORA_PARAMS)
MINDSPORE_WRITERS = {"ckpt": CkptWriter, "safetensors": SafetensorsWriter}
MANIFEST = "manifest.json"


def check_projection(source, rules, llm_hidden_size, config_name):
    """Refuse a checkpoint whose image projection does not output the LLM hidden size (shapes only)."""
    for rule in rules:
        if PROJECTION_WEIGHT in rule.targets and len(rule.sources) == 1 and rule.sources[0] in source:
            key = rule.sources[0]
            width = source[key].shape[0]
            if width != llm_hidden_size:
                raise ProjectionMismatchError(
                    f"{source.description}: {key} {list(source[key].shape)} outputs {width} features, but the "
                    f"LLM hidden size is {llm_hidden_size} ({config_name}): the projection belongs to another LLM")
            return


def model_parameter_shapes(model_cls, config):
    """{parameter name: shape} of the model a config builds (no weights are allocated or initialised)."""
    with no_init_parameters():
        model = model_cls(config)
    return {param.name: tuple(param.shape) for param in model.get_parameters()}


def mindspore_parts(name):
    """The split output parts a converted parameter goes to."""
    if name.endswith(LORA_SUFFIXES):
        return ["llm_lora"]
    parts = [part for part, prefixes in SPLIT_PARTS.items() if name.startswith(prefixes)]
    if len(parts) != 1:
        raise ConversionError(f"{name} belongs to no split checkpoint part")
    return parts + (["llm_embedding"] if name == LLM_EMBEDDING else [])


def write_plan(plan, files, parts_of, writer_for, dtype, description):
    """Run `plan` into `files` ({part: final path}); parts_of(name) -> parts; writer_for(part, path, entries).

    Returns {part: {"path", "bytes", "sha256", "tensors"}}. writer_for makes the writers through the
    caller's OutputFiles, so every file stays temporary until the caller commits.
    """
    entries = {}
    for name, meta in planned_outputs(plan, dtype):
        for part in parts_of(name):
            entries.setdefault(part, []).append((name, meta))
    missing = set(entries) - set(files)
    if missing:
        raise ConversionError(f"no output file for part(s) {sorted(missing)}")
    writers = {part: writer_for(part, files[part], entries[part]) for part in entries}
    routes = {}
    for part, part_entries in entries.items():
        for name, _ in part_entries:
            routes.setdefault(name, []).append(writers[part])
    execute(plan, routes, dtype, description)
    return {part: dict(writer.close(), path=files[part]) for part, writer in writers.items()}


def shard_groups(entries, max_bytes):
    """Consecutive groups of (name, meta) whose bytes stay within max_bytes (a bigger tensor gets its own)."""
    groups, current, size = [], [], 0
    for name, meta in entries:
        nbytes = meta.numel() * meta.dtype.itemsize
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, meta))
        size += nbytes
    if current:
        groups.append(current)
    return groups


HF_WRITERS = {"bin": TorchBinWriter, "safetensors": SafetensorsWriter}


def write_hf_shards(plan, outputs, folder, fmt, names, dtype, max_shard_size, description):
    """Write `plan` as an HF-style weight set in `folder`: one file, or shards + index json.

    names: (index json, single file, shard pattern) of the format. Returns the written file names.
    """
    index_name, single_name, pattern = names
    groups = shard_groups(planned_outputs(plan, dtype), max_shard_size)
    if len(groups) == 1:
        files = {0: os.path.join(folder, single_name)}
    else:
        files = {k: os.path.join(folder, pattern.format(k + 1, len(groups))) for k in range(len(groups))}
    shard_of = {name: k for k, group in enumerate(groups) for name, _ in group}

    def writer_for(shard, path, entries):
        args = (entries, {"format": "pt"}) if fmt == "safetensors" else (entries,)
        return outputs.writer(HF_WRITERS[fmt], path, *args)

    written = write_plan(plan, files, lambda name: [shard_of[name]], writer_for, dtype, description)
    if len(groups) > 1:
        total = sum(meta.numel() * meta.dtype.itemsize for group in groups for _, meta in group)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: os.path.basename(files[k]) for name, k in shard_of.items()}}
        outputs.write_text(os.path.join(folder, index_name), json.dumps(index, indent=2) + "\n")
    return [os.path.basename(written[k]["path"]) for k in sorted(written)]


def parse_size(text):
    """'4GB' -> 4e9 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024; a bare number is bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConversionError(f"cannot read the size {text!r} (examples: 4GB, 500MB, 2GiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    return int(number * scale)


def manifest(source_format, plan, source_hashes, outputs, dtype_name, file_format, config_dict, extra):
    """The self-description of a conversion written as manifest.json."""
    files = [{"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": source_hashes.get(path)}
             for path in plan.source.files]
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0])] + sys.argv[1:],
        "tool_versions": tool_versions(),
        "source": {"format": source_format, "files": files, "keys": len(plan.source),
                   "keys_converted": len(plan.used_keys), "keys_ignored": plan.ignored},
        "output": {"dtype": dtype_name, "format": file_format,
                   "files": {part: dict(info, path=os.path.abspath(info["path"])) for part, info in outputs.items()}},
        **extra,
        "config": config_dict,
    }


def source_bytes(source):
    return sum(os.path.getsize(path) for path in source.files)


class Timer:
    """Wall time and throughput line printed at the end of a job."""

    def __init__(self):
        self.start = time.perf_counter()

    def summary(self, nbytes):
        """'<GB> GB of source in <s> s (<MB/s> MB/s)'."""
        seconds = time.perf_counter() - self.start
        return f"{nbytes / 1e9:.2f} GB of source in {seconds:.1f} s ({nbytes / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
