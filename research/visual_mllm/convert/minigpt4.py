"""The MiniGPT-4 and MiniGPT4Qwen conversion job behind `convert_weight.py --model_type minigpt4 | minigpt4qwen`.

Four sources, as the releases ship them: `eva_vit_g.pth` (--eva_vit_path), `blip2_pretrained_flant5xxl.pth`
(--qformer_path), the projection checkpoint (--proj_path: MiniGPT-4's `pretrained_minigpt4*.pth`,
MiniGPT4Qwen's `model.pth`) and the LLM's HF folder (--llm_path: Vicuna, Qwen-7B-Chat). Their key tables
are lavis.py (image side), llama_hf.py and qwen_hf.py (LLMs). Output, in --output_dir: the split
checkpoints (vit / qformer with ln_vision and the projection / llm, named by the model class's
`split_files`), the LLM's embedding table alone, the tokenizer files copied from the LLM folder,
manifest.json and `run_<family>.yaml`, which run_infer.py takes as it is.

Before the first tensor is read: every file is recognised (one given to the wrong flag is named with
the flag it belongs to), the sizes are read from config.json and the tensor shapes, the projection
width is checked against the LLM, every key of every file is planned (converted, or explicitly
ignored: the ViT blocks past --vit_num_layers, the Q-Former text branch, `Qformer.cls.*`, `t5_proj`,
position_ids buffers, LLaMA's rotary inv_freq), and the processor of the YAML is built. Outputs appear
only when everything is written.
"""
import os
from dataclasses import asdict, dataclass
from importlib import import_module
from types import ModuleType
from typing import Optional

from .. import families
from ..families import Family
from . import lavis
from .job import (MANIFEST, Timer, check_projection, combine_plans, model_parameters, output_files, part_files,
                  planned_parts, processor_error, run_yaml, run_yaml_name, tokenizer_files, write_mindspore)
from .keymap import plan
from .readers import ConversionError, Source, read_json
from .hf_folder import CONFIG_FILE, read_source as read_hf_weights

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


def read_image_files(spec, eva_vit_path, qformer_path, proj_path):
    family = spec.family.name
    return {"eva_vit": read_image_file(eva_vit_path, lavis.EVA_FILE, family),
            "qformer": read_image_file(qformer_path, lavis.BLIP2_FILE, family),
            "proj": read_image_file(proj_path, lavis.PROJECTION_FILES[family], family)}


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
                 file_format="ckpt", options=Options()):
    """Convert the four sources of a MiniGPT-4 / MiniGPT4Qwen model into output_dir; returns the run YAML's path."""
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
    data = run_yaml(family, config, files, {"vocab_file": llm.vocab_file})
    err = processor_error(data)
    if err is not None:
        raise ConversionError(f"the tokenizer {llm.vocab_file} does not fit the model of --llm_path: {err}")
    copies = [(path, os.path.join(output_dir, os.path.basename(path)))
              for path in tokenizer_files(family.tokenizer_class, llm.vocab_file)]
    data["processor"]["tokenizer"]["vocab_file"] = copies[0][1]
    yaml_path = os.path.join(output_dir, run_yaml_name(family))
    given = {"--eva_vit_path": eva_vit_path, "--qformer_path": qformer_path, "--proj_path": proj_path,
             "--llm_path": llm_path}
    header = [f"{family.model_class.__name__} converted by convert_weight.py --model_type {model_type} from",
              *(f"  {flag} {os.path.abspath(path)}" for flag, path in given.items()),
              f"Sizes from the tensor shapes and {llm.config_file}; see {MANIFEST} beside this file.",
              f"python run_infer.py --config {yaml_path} --image_path IMG --prompt \"...\""]
    extra = {"family": family.name, "sources": {flag: os.path.abspath(path) for flag, path in given.items()},
             "keys_by_source": key_counts(the_plan, sources), "options": asdict(options),
             "tokenizer": {"vocab_file": llm.vocab_file, "from": "--llm_path"}}
    write_mindspore(the_plan, spec.source_format, files, embedding, (yaml_path, data, header), timer, dtype,
                    file_format, copies, extra)
    return yaml_path
