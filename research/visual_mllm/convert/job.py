"""What every conversion job shares, whatever the family: the checks before any tensor is read, the
split MindSpore output files with the run YAML and manifest that describe them, HF-style shards.

Split output (as the older MindFormers port wrote it, and as the YAML keys vit_checkpoint /
qformer_checkpoint / llm_checkpoint load it): `vit`, `qformer` (with ln_vision and the projection) and
`llm` follow models.weights.SPLIT_PARTS; `llm_embedding` repeats the LLM's token embedding table alone
(for Lite mode, where only the embedding runs in MindSpore); `llm_lora` holds LoRA weights kept apart.
A family's job reads its sources and plans; `write_mindspore` writes everything or nothing.
"""
import datetime
import json
import os
import re
import sys
import tempfile
import time

import mindspore as ms
import torch
import yaml
from mindformers.models.build_config import build_model_config
from mindspore.nn.utils import no_init_parameters

from .. import families
from ..lora_layout import LORA_PARAMS
from ..layers import SCALE_SUFFIX, Embedding, quantize_int8
from ..models.base import ProjectionMismatchError
from ..models.pretrained import config_to_yaml_dict
from ..models.weights import SPLIT_PARTS
from ..registry import load_processor_from_yaml, processor_class, read_run_config
from .engine import DTYPES, BackgroundHashes, execute, output_dtype, planned_outputs, tool_versions
from .keymap import Plan, Rule, Step, Transform
from .readers import ConversionError, Source, read_mindspore_ckpt, read_safetensors
from .writers import CkptWriter, OutputFiles, SafetensorsWriter, TorchBinWriter

PROJECTION_WEIGHT = "image_encoder.projection.weight"
LORA_SUFFIXES = tuple("." + name for name in LORA_PARAMS)
MINDSPORE_WRITERS = {"ckpt": CkptWriter, "safetensors": SafetensorsWriter}
MANIFEST = "manifest.json"
YAML_KEYS = {"vit": "vit_checkpoint", "qformer": "qformer_checkpoint", "llm": "llm_checkpoint"}


def check_projection(source, rules, llm_hidden_size, config_name):
    """Refuse a checkpoint whose image projection does not output the LLM hidden size (shapes only)."""
    for rule in rules:
        if PROJECTION_WEIGHT in rule.targets and len(rule.sources) == 1 and rule.sources[0] in source:
            key = rule.sources[0]
            width = source[key].shape[0]
            if width != llm_hidden_size:
                raise ProjectionMismatchError(
                    f"{source.description}: {key} {list(source[key].shape)} outputs {width} features, but the "
                    f"LLM hidden size is {llm_hidden_size} ({config_name}): the projection belongs to another LLM size "
                    f"(likely cause: a 13B projection with a 7B LLM, or the reverse)")
            return


def model_parameters(model_cls, config):
    """({parameter name: shape}, name of the LLM's token embedding table) of the model a config builds.

    No weights are allocated or initialised. The embedding is the weight of the decoder's Embedding
    cell, under whatever name the decoder gives it (GLM `word_embeddings`, LLaMA `embed_tokens`).
    """
    with no_init_parameters():
        model = model_cls(config)
    embeddings = [cell.weight.name for _, cell in model.llm.cells_and_names() if isinstance(cell, Embedding)]
    if len(embeddings) != 1:
        raise ConversionError(f"{model_cls.__name__}: expected one token embedding in the LLM, found {embeddings}")
    return {param.name: tuple(param.shape) for param in model.get_parameters()}, embeddings[0]


def model_parameter_shapes(model_cls, config):
    """{parameter name: shape} of the model a config builds (no weights are allocated or initialised)."""
    return model_parameters(model_cls, config)[0]


def mindspore_parts(name, embedding):
    """The split output parts a converted parameter goes to; `embedding` also goes to llm_embedding."""
    if name.endswith(LORA_SUFFIXES):
        return ["llm_lora"]
    parts = [part for part, prefixes in SPLIT_PARTS.items() if name.startswith(prefixes)]
    if len(parts) != 1:
        raise ConversionError(f"{name} belongs to no split checkpoint part")
    return parts + (["llm_embedding"] if name == embedding else [])


def planned_parts(the_plan, embedding):
    """The split output parts the targets of a plan go to."""
    return {part for name in the_plan.targets for part in mindspore_parts(name, embedding)}


def combine_plans(plans, description):
    """One Plan over the sources of several plans ({label: Plan}), e.g. one per file a family reads.

    Source keys become `<label>:<key>`, so that two files may hold the same key name.
    """
    tensors, files, steps, ignored = {}, [], [], []
    for label, part in plans.items():
        def named(key, label=label):
            return f"{label}:{key}"

        tensors.update((named(key), tensor) for key, tensor in part.source.items())
        files += part.source.files
        steps += [Step(Rule(tuple(map(named, step.rule.sources)), step.rule.targets, step.rule.transform),
                       step.outputs) for step in part.steps]
        ignored += map(named, part.ignored)
    return Plan(Source(tensors, files, description), steps, ignored)


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


# ----------------------------------------------------------------------------------------- to MindSpore

def part_files(model_cls):
    """part -> default output file name (no extension): the model's split files, the embedding-only
    file and the kept-LoRA file named after its LLM file."""
    llm = model_cls.split_files["llm"]
    return dict(model_cls.split_files, llm_embedding=f"{llm}_embedding", llm_lora=f"{llm}_lora")


def writer_class(part, file_format):
    """Kept LoRA weights are always a .ckpt: the finetune LoRA checkpoint format (it holds a text entry)."""
    return CkptWriter if part == "llm_lora" else MINDSPORE_WRITERS[file_format]


def output_files(output_dir, file_format, names, overrides, parts):
    """{part: final path}: `<output_dir>/<names[part]>.<format>` unless overrides gives the part's path."""
    files = {}
    for part in parts:
        extension = writer_class(part, file_format).suffix
        path = overrides.get(part) or os.path.join(output_dir, names[part] + extension)
        if not path.endswith(extension):
            raise ConversionError(f"{path}: the output file of part {part} must end in {extension} (--format "
                                  f"{file_format}; MindSpore picks the reader by the extension)")
        files[part] = os.path.abspath(path)
    return files


def run_yaml_name(family):
    return f"run_{family.name}.yaml"


def tower_configs(config):
    """{split part: the TowerConfig of the tower it holds} of a composite model config (CogVLM's adapter file
    has no tower config of its own: the adapter follows the ViT's)."""
    towers = config.image_encoder_config.towers()
    parts = {"vit": towers["vit_config"], "llm": config.llm_config}
    if "qformer_config" in towers:
        parts["qformer"] = towers["qformer_config"]
    return parts


def set_param_dtypes(config, the_plan, dtype):
    """Set each tower's param_dtype to the dtype its matrices are written in (float32 if they differ), so
    the run YAML holds the weights as converted: a float16 release stays float16 in memory."""
    requested = DTYPES[dtype]
    for part, tower in tower_configs(config).items():
        written = {output_dtype(meta.dtype, requested) for name, meta in the_plan.targets.items()
                   if name.startswith(SPLIT_PARTS[part]) and meta.dim() >= 2 and meta.dtype.is_floating_point}
        tower.param_dtype = str(written.pop()).replace("torch.", "") if len(written) == 1 else "float32"


def quantized_step(step, names):
    """`step` with each of its targets in `names` written as int8 and `<name>_scale` (float32 [out]),
    quantised as the model quantises at load (layers.quantize_int8: symmetric, per output channel)."""
    inner = step.rule.transform

    def forward(*tensors):
        out = []
        for name, tensor in zip(step.rule.targets, inner(*tensors)):
            if name in names:
                weight, scale = quantize_int8(tensor.float().numpy())  # [out, in] int8, [out] float32
                out += [torch.from_numpy(weight), torch.from_numpy(scale)]
            else:
                out.append(tensor)
        return out

    targets, outputs = [], []
    for name, meta in zip(step.rule.targets, step.outputs):
        if name in names:
            targets += [name, name + SCALE_SUFFIX]
            outputs += [meta.to(torch.int8), torch.empty(meta.shape[:1], dtype=torch.float32, device="meta")]
        else:
            targets.append(name)
            outputs.append(meta)
    return Step(Rule(step.rule.sources, tuple(targets), Transform(f"quantize_int8({inner.name})", forward)),
                tuple(outputs))


def apply_precision(config, model_cls, the_plan, dtype, quantize):
    """The plan as written and the config that loads it: with quantize "int8" the LLM's Linear weights
    (those the model holds in int8) become int8 + float32 scales and the LLM config says quantize: int8;
    each tower's param_dtype is the dtype its matrices are written in (set_param_dtypes).
    Returns (plan, manifest entries)."""
    extra = {}
    if quantize:
        config.llm_config.quantize = quantize
        with no_init_parameters():
            model = model_cls(config)
        names = {param.name for param in model.get_parameters() if param.dtype == ms.int8}
        steps = [quantized_step(step, names) if names & set(step.rule.targets) else step for step in the_plan.steps]
        the_plan = Plan(the_plan.source, steps, the_plan.ignored, {name + SCALE_SUFFIX for name in names})
        extra["quantize"] = {"llm": quantize, "tensors": len(names),
                             "scheme": "weight-only int8 (W8A16): symmetric, one float32 scale per output channel "
                                       "(<weight>_scale); embeddings, norms, lm_head and the image side as --dtype"}
    set_param_dtypes(config, the_plan, dtype)
    return the_plan, extra


def run_yaml(family, config, checkpoints, tokenizer):
    """The run YAML (as a dict) of a family's config, its checkpoint files {part: path} and the
    processor's tokenizer section (vocab_file and the tokenizer's other arguments)."""
    model_config = config_to_yaml_dict(config)
    for part, key in YAML_KEYS.items():
        model_config[key] = checkpoints[part]
    return {"seed": 0, "run_mode": "predict",
            "model": {"model_config": model_config, "arch": {"type": family.model_class.__name__}},
            "processor": {"type": processor_class(family).__name__,
                          "image_processor": {"type": "BlipImageProcessor",
                                              "image_size": config.image_encoder_config.vit_config.image_size},
                          "tokenizer": {"type": family.tokenizer_class.__name__, **tokenizer}}}


def yaml_text(data, header):
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def processor_error(data):
    """The ValueError building the run YAML's processor raises (tokenizer vs model special ids, image
    size, query count), or None when it fits; checked before converting anything."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(yaml_text(data, []))
        try:
            load_processor_from_yaml(path)
        except ValueError as err:
            return err
    return None


def tokenizer_files(tokenizer_class, vocab_file):
    """The tokenizer's vocabulary file and its FILE_LIST files beside it (tokenizer_config.json): what to copy."""
    folder = os.path.dirname(vocab_file)
    return [vocab_file] + [os.path.join(folder, name) for name in tokenizer_class.FILE_LIST
                           if os.path.isfile(os.path.join(folder, name))]


def write_mindspore(the_plan, source_format, files, embedding, run, timer, dtype="auto", file_format="ckpt",
                    copies=(), extra=None, texts=None):
    """Convert `the_plan` into the split MindSpore files and write the run YAML and manifest.json beside
    them, all or nothing; prints what was written. Returns {part: output file info}.

    files: {part: path} (output_files); embedding: the LLM's embedding parameter (also written alone);
    run: (YAML path, YAML dict, header lines); timer: the job's Timer (the summary line reports it);
    copies: [(file, destination)] (the tokenizer files); extra: manifest entries; texts: {part: {name:
    text}} text entries of a .ckpt part (the kept LoRA layout).
    """
    yaml_path, data, header = run
    texts = texts or {}
    source = the_plan.source
    hashes = BackgroundHashes(source.files)
    try:
        with OutputFiles() as outputs:
            def writer_for(part, path, entries):
                if part in texts:
                    args = (texts[part],)
                else:
                    args = ({"format": "ms"},) if file_format == "safetensors" else ()
                return outputs.writer(writer_class(part, file_format), path, entries, *args)

            written = write_plan(the_plan, files, lambda name: mindspore_parts(name, embedding), writer_for,
                                 DTYPES[dtype], f"{source_format} -> MindSpore")
            for path, destination in copies:
                outputs.copy(path, destination)
            outputs.write_text(yaml_path, yaml_text(data, header))
            record = manifest(source_format, the_plan, hashes.result(), written, dtype, file_format, data,
                              extra or {})
            outputs.write_text(os.path.join(os.path.dirname(yaml_path), MANIFEST), json.dumps(record, indent=2) + "\n")
            outputs.commit()
    finally:
        hashes.cancel()
    print(f"converted {len(the_plan.used_keys)} of {len(source)} {source_format} tensors ({len(the_plan.ignored)} "
          f"ignored) into {len(written)} files: {timer.summary(source_bytes(source))}")
    for part, info in sorted(written.items()):
        print(f"  {part}: {info['path']} ({info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB)")
    print(f"run it: python run_infer.py --config {yaml_path} --image_path IMG --prompt \"...\"")
    return written


# ----------------------------------------------------------------------------------------- from MindSpore

def read_model_yaml(config_yaml, family):
    """(run config, model config) of a run YAML, refused when its model is not of `family` (a Family)."""
    run_config = read_run_config(config_yaml)
    config = build_model_config(run_config.model.model_config)
    found = families.family_of(config)
    if found is not family:
        raise ConversionError(f"{config_yaml} holds a {found.name} model ({type(config).__name__}): give "
                              f"--model_type {found.name}")
    if config.llm_config.quantize:
        raise ConversionError(f"{config_yaml}: the LLM is quantised ({config.llm_config.quantize}), and the release "
                              "formats hold float weights: convert back from a float conversion (without --quantize)")
    return run_config, config


def read_yaml_checkpoints(config_yaml, family):
    """(run config, model config, checkpoint files, their Source) of a run YAML of `family` to convert back."""
    run_config, config = read_model_yaml(config_yaml, family)
    checkpoints = config.checkpoint_files()
    if not checkpoints:
        raise ConversionError(f"{config_yaml} names no checkpoint (vit_checkpoint / qformer_checkpoint / "
                              "llm_checkpoint or checkpoint_name_or_path): nothing to convert")
    return run_config, config, checkpoints, read_mindspore_checkpoints(checkpoints)


def read_mindspore_checkpoints(paths):
    """The MindSpore checkpoint files of a run YAML as one Source (keys must not repeat across files)."""
    tensors = {}
    for path in paths:
        found = read_safetensors(path) if path.endswith(".safetensors") else read_mindspore_ckpt(path)
        twice = set(found) & set(tensors)
        if twice:
            raise ConversionError(f"{path} repeats parameters of another checkpoint: {sorted(twice)[:5]}")
        tensors.update(found)
    return Source(tensors, paths, f"MindSpore checkpoints {', '.join(paths)}")


# ----------------------------------------------------------------------------------------- HF shards

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
