"""The MiniGPT-4 and MiniGPT4Qwen conversion job behind `convert_weight.py --model_type minigpt4 | minigpt4qwen`.

Four sources, as the releases ship them: `eva_vit_g.pth` (--eva_vit_path), `blip2_pretrained_flant5xxl.pth`
(--qformer_path), the projection checkpoint (--proj_path: MiniGPT-4's `pretrained_minigpt4*.pth`,
MiniGPT4Qwen's `model.pth`) and the LLM's HF folder (--llm_path: Vicuna, Qwen-7B-Chat). Their key tables
are lavis.py (image side), llama_hf.py and qwen_hf.py (LLMs). Output, in --output_dir: the split
checkpoints (vit / qformer with ln_vision and the projection / llm, named by the model class's
`split_files`), the LLM's embedding table alone, the tokenizer files and the LLM folder's other
small files (config.json, generation_config.json, special_tokens_map.json: kept for the way back)
copied from the LLM folder, manifest.json and `run_<family>.yaml`, which run_infer.py takes as it is.

Before the first tensor is read: every file is recognised (one given to the wrong flag is named with
the flag it belongs to), the sizes are read from config.json and the tensor shapes, the projection
width is checked against the LLM, every key of every file is planned (converted, or explicitly
ignored: the ViT blocks past --vit_num_layers, the Q-Former text branch, `Qformer.cls.*`, `t5_proj`,
position_ids buffers, LLaMA's rotary inv_freq), and the processor of the YAML is built. Outputs appear
only when everything is written.

to_release, the way back (`convert_weight.py --model_type F --mindspore_config run_F.yaml --output_dir
REL`, e.g. after finetuning): the checkpoints a run YAML names become the release files again, in
REL: eva_vit_g.pth and blip2_pretrained_flant5xxl.pth (lavis.py: the layout and the zero block that
keeps the default --vit_num_layers right), the projection file (`{'model': {projection.*}}`, under the
family record's `release_projection` name) and the LLM's HF folder (`release_llm`: shards + index,
the tokenizer files, and the config.json kept beside the tokenizer by the conversion, as it was).
Converting REL again with the flags the first conversion needed gives the same model; the summary
prints that command.
"""
import json
import os
import shlex
from dataclasses import asdict, dataclass
from importlib import import_module
from types import ModuleType
from typing import Optional

from .. import families
from ..families import Family
from . import lavis
from .engine import DTYPES, planned_outputs
from .job import (MANIFEST, Timer, apply_precision, check_projection, combine_plans, model_parameters, output_files,
                  part_files, planned_parts, processor_error, read_yaml_checkpoints, run_yaml,
                  run_yaml_name, source_bytes, tokenizer_files, write_hf_shards, write_mindspore, write_plan)
from .keymap import Plan, plan
from .readers import ConversionError, Source, names, read_json
from .hf_folder import BIN, CONFIG_FILE, KEPT_FILES, SAFETENSORS, read_source as read_hf_weights
from .writers import OutputFiles, TorchBinWriter

JOB = "lavis"  # the families.Conversion job this module runs
DEFAULT_SEQ_LENGTH = 2048  # the context run_infer.py generates in (prompt + answer), at most the LLM's own


@dataclass(frozen=True)
class Spec:
    """What the job reads of a family record: the family, its LLM folder's format module, the projection."""

    family: Family
    llm: ModuleType    # a convert/ module with the LLM folder's key tables: llama_hf, qwen_hf
    projection: str    # the projection's key prefix in --proj_path

    @classmethod
    def of(cls, name):
        family = families.get(name)
        if family.conversion.job != JOB:
            raise ConversionError(f"--model_type {name}: its release is not converted from LAVIS-era files")
        return cls(family, import_module(f"{__package__}.{family.conversion.llm_format}"),
                   family.conversion.projection)

    @property
    def source_format(self):
        return f"lavis+{self.projection}+{self.llm.FORMAT}"


@dataclass(frozen=True)
class Options:
    """What is in no file: ViT blocks to run (None = all but the file's last), heads (None = the released
    models' head widths, lavis.py), the generation context (None = min(2048, the LLM's trained length))."""

    vit_num_layers: Optional[int] = None
    vit_num_heads: Optional[int] = None
    qformer_num_heads: Optional[int] = None
    seq_length: Optional[int] = None


@dataclass(frozen=True)
class LlmFolder:
    config_file: str
    config: dict       # config.json
    vocab_file: str    # tokenizer.model / qwen.tiktoken
    tokenizer: object
    source: Source


# which model parameters each source fills (by prefix), as `<label>: ...` in the manifest
FILE_PARTS = {"eva_vit": ("image_encoder.vit.",), "qformer": ("image_encoder.ln_vision.", "image_encoder.qformer."),
              "proj": ("image_encoder.projection.",), "llm": ("llm.",)}


# ----------------------------------------------------------------------------------------- the sources

def read_image_file(path, kind, family):
    """One of the three image-side .pth files as a Source, refused with its flag if it is another kind."""
    if not os.path.exists(path):
        raise ConversionError(f"{kind.flag} {path} does not exist")
    if os.path.isdir(path):
        raise ConversionError(f"{kind.flag} {path} is a folder; {kind.flag} expects {kind.what}")
    path = os.path.abspath(path)
    tensors = lavis.read_state_dict(path)
    lavis.check_kind(tensors, path, kind, family)
    return Source(tensors, [path], f"{kind.flag} {path}")


def refuse_lora(proj, proj_path):
    """A projection checkpoint trained with LoRA on the LLM (MiniGPT4Qwen's get_lora: peft lora_A / lora_B
    weights beside llm_proj) is refused by name: merging it is not supported (no released file to test on)."""
    lora = sorted(key for key in proj if ".lora_A" in key or ".lora_B" in key)
    if lora:
        raise ConversionError(
            f"--proj_path {proj_path} holds LoRA weights of the LLM ({len(lora)} tensors, e.g. {lora[0]}): "
            "converting them is not supported; merge them into the LLM folder first (peft's merge_and_unload, "
            "then save_pretrained) and give a checkpoint with the projection only")


def read_image_files(spec, eva_vit_path, qformer_path, proj_path):
    family = spec.family.name
    proj = read_image_file(proj_path, lavis.PROJECTION_FILES[family], family)
    refuse_lora(proj, proj_path)
    return {"eva_vit": read_image_file(eva_vit_path, lavis.EVA_FILE, family),
            "qformer": read_image_file(qformer_path, lavis.BLIP2_FILE, family), "proj": proj}


def read_llm_folder(spec, path):
    """config.json, the tokenizer and the weights of the LLM's HF folder."""
    llm = spec.llm
    config_file = os.path.join(os.path.abspath(path), CONFIG_FILE)
    if not os.path.isdir(path) or not os.path.isfile(config_file):
        raise ConversionError(f"--llm_path {path}: --model_type {spec.family.name} expects {llm.WHAT}")
    config = read_json(config_file)
    if config.get("model_type") != llm.MODEL_TYPE:
        raise ConversionError(f"--llm_path {path} holds a {config.get('model_type')!r} model ({config_file}); "
                              f"--model_type {spec.family.name} expects {llm.WHAT}")
    vocab_file = os.path.join(os.path.abspath(path), llm.TOKENIZER.vocab_files_names["vocab_file"])
    try:
        tokenizer = llm.TOKENIZER(vocab_file=vocab_file)
    except (OSError, ValueError) as err:
        raise ConversionError(f"--llm_path {path}: cannot load its tokenizer: {err}") from None
    weights = read_hf_weights(path)
    return LlmFolder(config_file, config, vocab_file, tokenizer,
                     Source(weights.tensors, weights.files, f"--llm_path {os.path.abspath(path)}"))


# ----------------------------------------------------------------------------------------- the plan

def model_config(spec, sources, llm, options):
    """The family's config: image side from the tensor shapes, LLM from config.json, ids from the tokenizer.

    Returns (config, blocks in the ViT file)."""
    llm_config, placeholder = spec.llm.read_config(llm.config, llm.tokenizer, llm.config_file)
    image, blocks = lavis.image_encoder_config(sources["eva_vit"], sources["qformer"], llm_config.hidden_size,
                                               options.vit_num_layers, options.vit_num_heads,
                                               options.qformer_num_heads)
    trained = llm_config.max_position_embeddings
    seq_length = min(DEFAULT_SEQ_LENGTH, trained) if options.seq_length is None else options.seq_length
    if not 1 <= seq_length <= trained:
        raise ConversionError(f"--seq_length {seq_length}: the LLM is trained for at most {trained} positions "
                              f"({llm.config_file})")
    config = spec.family.config_class(image_encoder_config=image, llm_config=llm_config, seq_length=seq_length,
                                      image_placeholder=placeholder)
    return config, blocks


def conversion_plan(spec, sources, llm, options):
    """(config, the combined Plan, the LLM embedding's name) for sources {label: Source} (FILE_PARTS' labels)."""
    config, blocks = model_config(spec, sources, llm, options)
    image = config.image_encoder_config
    check_projection(sources["proj"], lavis.projection_rules(spec.projection), config.llm_config.hidden_size,
                     llm.config_file)
    maps = {"eva_vit": (lavis.vit_rules(image.vit_config), lavis.vit_ignored(image.vit_config, blocks)),
            "qformer": (lavis.qformer_rules(image.qformer_config),
                        lavis.qformer_ignored(sources["qformer"], image.qformer_config)),
            "proj": (lavis.projection_rules(spec.projection), lavis.PROJECTION_IGNORED),
            "llm": (spec.llm.rules(config.llm_config), spec.llm.ignored_keys(config.llm_config))}
    expected, embedding = model_parameters(spec.family.model_class, config)
    orphans = [name for name in expected if not any(name.startswith(prefixes) for prefixes in FILE_PARTS.values())]
    if orphans:
        raise ConversionError(f"{spec.family.model_class.__name__} has parameters no source fills: {orphans[:5]}")
    plans = {}
    for label, (rules, ignored) in maps.items():
        filled = {name: shape for name, shape in expected.items() if name.startswith(FILE_PARTS[label])}
        sizes = f"sizes from the tensor shapes and {llm.config_file}"
        plans[label] = plan(sources[label], rules, ignored, filled, f"{sources[label].description} ({sizes})")
    return config, combine_plans(plans, f"{spec.family.name} sources"), embedding


# ----------------------------------------------------------------------------------------- the job

def key_counts(the_plan, sources):
    """{label: {"keys", "converted", "ignored"}} of each source of the combined plan."""
    def count(keys, label):
        return sum(key.startswith(label + ":") for key in keys)

    return {label: {"keys": len(source), "converted": count(the_plan.used_keys, label),
                    "ignored": count(the_plan.ignored, label)} for label, source in sources.items()}


def to_mindspore(model_type, eva_vit_path, qformer_path, proj_path, llm_path, output_dir, dtype="auto",
                 file_format="ckpt", options=Options(), quantize=None):
    """Convert the four sources of a MiniGPT-4 / MiniGPT4Qwen model into output_dir; returns the run YAML's path.
    quantize: None, or "int8" to write the LLM's Linear weights as weight-only int8 (job.apply_precision)."""
    timer = Timer()
    spec = Spec.of(model_type)
    family = spec.family
    output_dir = os.path.abspath(output_dir)
    sources = read_image_files(spec, eva_vit_path, qformer_path, proj_path)
    llm = read_llm_folder(spec, llm_path)
    sources["llm"] = llm.source
    config, the_plan, embedding = conversion_plan(spec, sources, llm, options)

    files = output_files(output_dir, file_format, part_files(family.model_class), {},
                         planned_parts(the_plan, embedding))
    the_plan, precision = apply_precision(config, family.model_class, the_plan, dtype, quantize)
    data = run_yaml(family, config, files, {"vocab_file": llm.vocab_file})
    err = processor_error(data)
    if err is not None:
        raise ConversionError(f"the tokenizer {llm.vocab_file} does not fit the model of --llm_path: {err}")
    copies = [(path, os.path.join(output_dir, os.path.basename(path)))
              for path in tokenizer_files(family.tokenizer_class, llm.vocab_file)]
    data["processor"]["tokenizer"]["vocab_file"] = copies[0][1]
    kept = [name for name in KEPT_FILES if os.path.isfile(os.path.join(os.path.dirname(llm.config_file), name))]
    copies += [(os.path.join(os.path.dirname(llm.config_file), name), os.path.join(output_dir, name)) for name in kept]
    yaml_path = os.path.join(output_dir, run_yaml_name(family))
    given = {"--eva_vit_path": eva_vit_path, "--qformer_path": qformer_path, "--proj_path": proj_path,
             "--llm_path": llm_path}
    header = [f"{family.model_class.__name__} converted by convert_weight.py --model_type {model_type} from",
              *(f"  {flag} {os.path.abspath(path)}" for flag, path in given.items()),
              f"Sizes from the tensor shapes and {llm.config_file}; see {MANIFEST} beside this file.",
              f"python run_infer.py --config {yaml_path} --image_path IMG --prompt \"...\""]
    extra = {"family": family.name, "sources": {flag: os.path.abspath(path) for flag, path in given.items()},
             "keys_by_source": key_counts(the_plan, sources), "options": asdict(options),
             "tokenizer": {"vocab_file": llm.vocab_file, "from": "--llm_path"},
             "llm_folder_files": {"kept": kept, "from": "--llm_path", "for": "the way back (--mindspore_config)"},
             **precision}
    write_mindspore(the_plan, spec.source_format, files, embedding, (yaml_path, data, header), timer, dtype,
                    file_format, copies, extra)
    return yaml_path


# ----------------------------------------------------------------------------------------- the way back

@dataclass(frozen=True)
class LlmFiles:
    """The LLM folder's files that are not weights, for writing it back."""

    vocab_file: str       # the run YAML's tokenizer
    config_file: str      # the config.json kept beside it (or --llm_path's)
    config: dict          # as it is written back
    changed: tuple        # its keys that differ from the kept file
    kept: tuple           # paths of the other KEPT_FILES found beside it


def llm_files(spec, run_config, config, llm_path, config_yaml):
    """The tokenizer of the run YAML and the config.json of its LLM folder, checked against the model config.

    config.json is the one the conversion kept beside the tokenizer (the YAML's vocab_file), or --llm_path's."""
    tokenizer = run_config.processor.tokenizer if run_config.processor else None
    vocab = tokenizer.vocab_file if tokenizer else None
    if not vocab:
        raise ConversionError(f"{config_yaml} names no tokenizer file (processor.tokenizer.vocab_file): the LLM "
                              f"folder needs one; set it to the {spec.llm.TOKENIZER.vocab_files_names['vocab_file']} "
                              f"of the model")
    if not os.path.isabs(vocab):
        vocab = os.path.join(os.path.dirname(os.path.abspath(config_yaml)), vocab)
    if not os.path.isfile(vocab):
        raise ConversionError(f"{config_yaml}: the tokenizer file {vocab} does not exist")
    folder = os.path.abspath(llm_path) if llm_path else os.path.dirname(vocab)
    config_file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_file):
        where = f"--llm_path {llm_path}" if llm_path else f"beside the tokenizer {vocab}"
        raise ConversionError(f"no {CONFIG_FILE} {where} (the conversion keeps the LLM folder's there): give the "
                              f"original LLM folder with --llm_path, whose {CONFIG_FILE} is written back")
    hf = read_json(config_file)
    if hf.get("model_type") != spec.llm.MODEL_TYPE:
        raise ConversionError(f"{config_file} is the config of a {hf.get('model_type')!r} model; --model_type "
                              f"{spec.family.name} writes {spec.llm.WHAT}")
    try:
        tokenizer = spec.llm.TOKENIZER(vocab_file=vocab)
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot load the tokenizer {vocab}: {err}") from None
    written, changed = spec.llm.release_config(hf, config.llm_config, tokenizer, config_file)
    kept = tuple(os.path.join(folder, name) for name in KEPT_FILES[1:] if os.path.isfile(os.path.join(folder, name)))
    return LlmFiles(vocab, config_file, written, tuple(changed), kept)


def check_checkpoints(source, model_class, config, config_yaml):
    """The checkpoints must hold exactly the parameters of the model the YAML builds, in their shapes."""
    expected, _ = model_parameters(model_class, config)
    problems = []
    missing = set(expected) - set(source)
    unexpected = set(source) - set(expected)
    if missing:
        problems.append(f"missing {names(missing)}")
    if unexpected:
        problems.append(f"not in the model {names(unexpected)}")
    wrong = [f"{key} {list(source[key].shape)} (the model: {list(shape)})" for key, shape in expected.items()
             if key in source and tuple(source[key].shape) != tuple(shape)]
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:6])}")
    if problems:
        raise ConversionError(f"{source.description} do not fit the model of {config_yaml}: {'; '.join(problems)}")


def release_rules(spec, config, hf_config):
    """{label: our key -> release key rules} of the four release parts (hf_config: the LLM's config.json)."""
    image = config.image_encoder_config
    return {"eva_vit": lavis.vit_export_rules(image.vit_config),
            "qformer": lavis.qformer_export_rules(image.qformer_config),
            "proj": lavis.projection_export_rules(spec.projection),
            "llm": spec.llm.export_rules(config.llm_config, hf_config)}


def split_plan(the_plan, rules):
    """{label: Plan} of the steps of `the_plan` whose rules are rules[label]."""
    label_of = {rule.targets: label for label, part in rules.items() for rule in part}
    steps = {label: [] for label in rules}
    for step in the_plan.steps:
        steps[label_of[step.rule.targets]].append(step)
    return {label: Plan(the_plan.source, part, []) for label, part in steps.items()}


def default_heads(width, head_dim):
    return width // head_dim if width % head_dim == 0 else None


def forward_command(spec, config, paths):
    """The convert_weight.py command that converts the written release back into this model."""
    image = config.image_encoder_config
    vit, qformer = image.vit_config, image.qformer_config
    args = ["python convert_weight.py", f"--model_type {spec.family.name}"]
    args += [f"{flag} {shlex.quote(paths[label])}" for flag, label in (
        ("--eva_vit_path", "eva_vit"), ("--qformer_path", "qformer"), ("--proj_path", "proj"), ("--llm_path", "llm"))]
    if vit.num_heads != default_heads(vit.hidden_size, lavis.EVA_HEAD_DIM):
        args.append(f"--vit_num_heads {vit.num_heads}")
    if qformer.num_heads != default_heads(qformer.hidden_size, lavis.BERT_HEAD_DIM):
        args.append(f"--qformer_num_heads {qformer.num_heads}")
    if config.seq_length != min(DEFAULT_SEQ_LENGTH, config.llm_config.max_position_embeddings):
        args.append(f"--seq_length {config.seq_length}")
    return " ".join(args + ["--output_dir OUT"])


def to_release(model_type, config_yaml, output_dir, dtype="auto", file_format="bin", max_shard_size=4 * 10 ** 9,
               llm_path=None):
    """Write the model of a run YAML (e.g. after finetuning) as the family's release files into output_dir.

    llm_path: the LLM folder whose config.json (and generation_config.json, special_tokens_map.json) is
    written back; None = the one the conversion kept beside the YAML's tokenizer. Returns output_dir.
    """
    timer = Timer()
    spec = Spec.of(model_type)
    conversion = spec.family.conversion
    run_config, config, checkpoints, source = read_yaml_checkpoints(config_yaml, spec.family)
    files = llm_files(spec, run_config, config, llm_path, config_yaml)
    check_checkpoints(source, spec.family.model_class, config, config_yaml)
    rules = release_rules(spec, config, files.config)
    the_plan = plan(source, [rule for part in rules.values() for rule in part], (), None,
                    f"{source.description} ({config_yaml})")
    lavis.check_no_k_bias(source, config.image_encoder_config.vit_config)
    output_dir = os.path.abspath(output_dir)
    llm_dir = os.path.join(output_dir, conversion.release_llm)
    paths = {"eva_vit": os.path.join(output_dir, lavis.EVA_RELEASE_FILE),
             "qformer": os.path.join(output_dir, lavis.BLIP2_RELEASE_FILE),
             "proj": os.path.join(output_dir, conversion.release_projection), "llm": llm_dir}
    containers = {"eva_vit": None, "qformer": lavis.LAVIS_CONTAINER, "proj": lavis.LAVIS_CONTAINER}
    parts = split_plan(the_plan, rules)
    requested = DTYPES[dtype]
    hf_config = dict(files.config)
    changed = list(files.changed)
    written_dtype = next(str(meta.dtype).replace("torch.", "") for _, meta in planned_outputs(parts["llm"], requested)
                         if meta.dtype.is_floating_point)
    if "torch_dtype" in hf_config and hf_config["torch_dtype"] != written_dtype:
        hf_config["torch_dtype"] = written_dtype
        changed.append("torch_dtype")
    written = []
    with OutputFiles() as outputs:
        for label, container in containers.items():
            def writer_for(part, path, entries, container=container):
                return outputs.writer(TorchBinWriter, path, entries, container)

            name = os.path.basename(paths[label])
            write_plan(parts[label], {label: paths[label]}, lambda _, label=label: [label], writer_for, requested,
                       f"MindSpore -> {name}")
            written.append(name)
        shards = write_hf_shards(parts["llm"], outputs, llm_dir, file_format,
                                 SAFETENSORS if file_format == "safetensors" else BIN, requested, max_shard_size,
                                 f"MindSpore -> {conversion.release_llm}/ ({spec.llm.FORMAT})")
        if changed:
            outputs.write_text(os.path.join(llm_dir, CONFIG_FILE), json.dumps(hf_config, indent=2) + "\n")
        else:  # as the release wrote it, byte for byte
            outputs.copy(files.config_file, os.path.join(llm_dir, CONFIG_FILE))
        for path in files.kept + tuple(tokenizer_files(spec.family.tokenizer_class, files.vocab_file)):
            outputs.copy(path, os.path.join(llm_dir, os.path.basename(path)))
        outputs.commit()
    config_note = f"{CONFIG_FILE} from {files.config_file}" + (f", {', '.join(changed)} updated" if changed else "")
    print(f"wrote {len(the_plan.targets)} tensors of {len(checkpoints)} MindSpore checkpoint(s) as the "
          f"{spec.family.name} release in {output_dir} ({', '.join(written)}, {conversion.release_llm}/: "
          f"{', '.join(shards)}; {config_note}): {timer.summary(source_bytes(source))}")
    print(f"back to MindSpore: {forward_command(spec, config, paths)}")
    return output_dir
