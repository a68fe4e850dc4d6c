"""The two VisualGLM conversion jobs behind convert_weight.py.

to_mindspore: a SAT or HF-format release (auto-detected) -> the split MindSpore checkpoints, the
    embedding-only checkpoint, manifest.json and one run YAML that run_infer.py takes as it is.
to_hf: the checkpoints a run YAML names (e.g. after finetuning) -> the HF-format release (config.json,
    .bin or .safetensors shards + index, the tokenizer files).

Everything that can be wrong with the input (format, config, tokenizer, keys, shapes, the projection
width) is checked before the first tensor is read; outputs appear only when everything is written.
"""
import json
import os
from dataclasses import dataclass

from .. import families
from ..lora_layout import META_KEY as LORA_META_KEY, layout_meta
from ..models.visualglm import VisualGLMForConditionalGeneration
from ..tokenizers.chatglm import PACKAGED_VOCAB_FILE, TOKENIZER_CONFIG_FILE, VOCAB_FILE_NAME, ChatGLMTokenizer
from . import visualglm_hf, visualglm_sat
from .hf_folder import BIN, CONFIG_FILE, SAFETENSORS
from .engine import DTYPES
from .job import (MANIFEST, Timer, apply_precision, check_projection, model_parameters, output_files, part_files,
                  planned_parts, processor_error, read_yaml_checkpoints, run_yaml, run_yaml_name,
                  source_bytes, tokenizer_files as files_of_tokenizer, write_hf_shards, write_mindspore)
from .keymap import plan
from .readers import ConversionError, read_json
from .writers import OutputFiles

FAMILY = families.get(VisualGLMForConditionalGeneration.family)
YAML_NAME = run_yaml_name(FAMILY)


# ----------------------------------------------------------------------------------------- the source

@dataclass(frozen=True)
class Release:
    """A detected source: its format module, the path given, and the folder beside its config."""

    module: object
    path: str
    folder: str


def detect(path):
    """Which release `path` is: a SAT folder / .pt, or an HF folder / index / weight file."""
    if not os.path.exists(path):
        raise ConversionError(f"--torch_path {path} does not exist")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "latest")) and os.path.isfile(os.path.join(path, "model_config.json")):
            return Release(visualglm_sat, path, path)
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            return Release(visualglm_hf, path, path)
    elif os.path.isfile(visualglm_sat.model_config_path(path)) and not path.endswith((".bin", ".safetensors", ".json")):
        return Release(visualglm_sat, path, os.path.dirname(visualglm_sat.model_config_path(path)))
    elif os.path.isfile(visualglm_hf.config_path(path)):
        return Release(visualglm_hf, path, os.path.dirname(path))
    raise ConversionError(
        f"cannot tell what {path} is: expected a VisualGLM SAT release (a folder with `latest` and "
        f"model_config.json, or its {visualglm_sat.CHECKPOINT_FILE}) or an HF-format release (a folder with "
        f"config.json and pytorch_model*.bin / *.safetensors, with their index json when sharded)")


@dataclass(frozen=True)
class TokenizerFiles:
    vocab_file: str        # ice_text.model; None = the tiny tokenizer shipped with visual_mllm
    num_image_tokens: int  # from tokenizer_config.json beside it (the published value is 0)
    origin: str


def tokenizer_files(vocab_file):
    """ice_text.model (None = the packaged one) and the tokenizer_config.json beside it, if any: what to copy."""
    return files_of_tokenizer(ChatGLMTokenizer, vocab_file or PACKAGED_VOCAB_FILE)


def find_tokenizer(tokenizer_arg, folder):
    """--tokenizer (ice_text.model or its folder), else ice_text.model in the source folder, else the packaged one."""
    if tokenizer_arg:
        vocab = os.path.join(tokenizer_arg, VOCAB_FILE_NAME) if os.path.isdir(tokenizer_arg) else tokenizer_arg
        if not os.path.isfile(vocab):
            raise ConversionError(f"--tokenizer: {vocab} not found")
        origin = "--tokenizer"
    elif os.path.isfile(os.path.join(folder, VOCAB_FILE_NAME)):
        vocab, origin = os.path.join(folder, VOCAB_FILE_NAME), "the source folder"
    else:
        return TokenizerFiles(None, 0, "visual_mllm's packaged tiny tokenizer")
    vocab = os.path.abspath(vocab)
    num_image_tokens = 0
    config = os.path.join(os.path.dirname(vocab), TOKENIZER_CONFIG_FILE)
    if os.path.isfile(config):
        num_image_tokens = int(read_json(config).get("num_image_tokens", 0))
    return TokenizerFiles(vocab, num_image_tokens, origin)


def read_config(release, tokenizer):
    """The VisualGLMConfig of a release (every size from its own config; <eop> from the tokenizer if absent)."""
    if release.module is visualglm_sat:
        try:
            eos = ChatGLMTokenizer(vocab_file=tokenizer.vocab_file,
                                   num_image_tokens=tokenizer.num_image_tokens).eos_token_id
        except (RuntimeError, OSError, ValueError) as err:
            raise ConversionError(f"cannot load the tokenizer {tokenizer.vocab_file} (from {tokenizer.origin}): "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        return visualglm_sat.model_config_path(release.path), visualglm_sat.config_from_sat(
            visualglm_sat.read_model_config(release.path), eos)
    return visualglm_hf.config_path(release.path), visualglm_hf.read_config(release.path)


def check_run_yaml(data, tokenizer):
    """Build the processor of the YAML (tokenizer vs model special ids, image size, query tokens) before converting."""
    err = processor_error(data)
    if err is None:
        return
    if tokenizer.vocab_file is None:
        raise ConversionError(f"no {VOCAB_FILE_NAME} beside the source, and the tokenizer shipped with "
                              f"visual_mllm does not fit this model ({err}); pass --tokenizer "
                              f"/path/to/{VOCAB_FILE_NAME}")
    raise ConversionError(f"the tokenizer ({tokenizer.vocab_file}, from {tokenizer.origin}) does not "
                          f"fit the model: {err}")


# ----------------------------------------------------------------------------------------- to MindSpore

def lora_meta(lora):
    """The layout entry of a finetune LoRA checkpoint (finetune/lora.py) for kept SAT LoRA weights.

    `load_lora_checkpoint(model, visualglm_glm_lora.ckpt)` then adds these LoRA layers to the model
    loaded from the run YAML (optionally merging them).
    """
    return layout_meta(lora.kept_rank, lora.kept_alpha, 0.0, lora.targets, [])


def to_mindspore(torch_path, output_dir, dtype="auto", file_format="ckpt", tokenizer=None, part_paths=None,
                 keep_lora=False, lora_alpha=None, quantize=None):
    """Convert a VisualGLM release into output_dir; returns the path of the run YAML written there.

    part_paths: {part: path} overriding where a part's checkpoint goes (vit, qformer, llm, llm_embedding).
    quantize: None, or "int8" to write the LLM's Linear weights as weight-only int8 (job.apply_precision).
    """
    timer = Timer()
    output_dir = os.path.abspath(output_dir)
    release = detect(torch_path)
    tokenizer = find_tokenizer(tokenizer, release.folder)
    config_file, config = read_config(release, tokenizer)
    source = release.module.read_source(release.path)
    lora = None
    if release.module is visualglm_sat:
        lora = visualglm_sat.detect_lora(source, visualglm_sat.read_model_config(release.path), lora_alpha)
        rules = visualglm_sat.sat_rules(config, lora, keep_lora)
        ignored = visualglm_sat.IGNORED
    else:
        rules, ignored = visualglm_hf.hf_rules(config), visualglm_hf.ignored_keys(config)
    check_projection(source, rules, config.llm_config.hidden_size, config_file)
    expected, embedding = model_parameters(VisualGLMForConditionalGeneration, config)
    if lora is not None and keep_lora:
        expected.update(lora.kept_shapes(config))
    the_plan = plan(source, rules, ignored, expected, f"{source.description} (sizes from {config_file})")

    files = output_files(output_dir, file_format, part_files(VisualGLMForConditionalGeneration), part_paths or {},
                         planned_parts(the_plan, embedding))
    if lora is not None and keep_lora and quantize:
        raise ConversionError(f"--lora keep with --quantize {quantize}: LoRA cannot go on quantised weights; "
                              "give --lora merge (the LoRA is merged before quantising)")
    the_plan, precision = apply_precision(config, VisualGLMForConditionalGeneration, the_plan, dtype, quantize)
    data = run_yaml(FAMILY, config, files, {"vocab_file": tokenizer.vocab_file,
                                            "num_image_tokens": tokenizer.num_image_tokens})
    check_run_yaml(data, tokenizer)
    copies = []
    if tokenizer.vocab_file is not None:
        data["processor"]["tokenizer"]["vocab_file"] = os.path.join(output_dir, VOCAB_FILE_NAME)
        copies = [(path, os.path.join(output_dir, os.path.basename(path)))
                  for path in tokenizer_files(tokenizer.vocab_file)]
    yaml_path = os.path.join(output_dir, YAML_NAME)
    header = [f"VisualGLM converted by convert_weight.py from {release.path} ({release.module.FORMAT}).",
              f"Sizes from {config_file}; see {MANIFEST} beside this file for the sources and outputs.",
              f"python run_infer.py --config {yaml_path} --image_path IMG --prompt \"...\""]
    extra = {"tokenizer": {"vocab_file": tokenizer.vocab_file, "from": tokenizer.origin,
                           "num_image_tokens": tokenizer.num_image_tokens}, **precision}
    texts = {}
    if lora is not None:
        extra["lora"] = {"layers": list(lora.layers), "rank": lora.rank, "alpha": lora.alpha,
                         "scaling": lora.scaling, "mode": "kept" if keep_lora else "merged"}
        if keep_lora:
            extra["lora"]["kept_as"] = lora_meta(lora)
            texts["llm_lora"] = {LORA_META_KEY: json.dumps(lora_meta(lora))}
    write_mindspore(the_plan, release.module.FORMAT, files, embedding, (yaml_path, data, header), timer, dtype,
                    file_format, copies, extra, texts)
    return yaml_path


# ----------------------------------------------------------------------------------------- to HF

def to_hf(config_yaml, output_dir, dtype="auto", file_format="bin", max_shard_size=4 * 10 ** 9):
    """Write the weights a run YAML names as the HF-format VisualGLM release into output_dir."""
    timer = Timer()
    run_config, config, checkpoints, source = read_yaml_checkpoints(config_yaml, FAMILY)
    the_plan = plan(source, visualglm_hf.export_rules(config), (), None, f"{source.description} ({config_yaml})")
    names = SAFETENSORS if file_format == "safetensors" else BIN
    requested = DTYPES[dtype]
    embedding_dtype = the_plan.targets["transformer.word_embeddings.weight"].dtype
    torch_dtype = requested if requested is not None else embedding_dtype
    tokenizer = run_config.processor.tokenizer if run_config.processor else None
    with OutputFiles() as outputs:
        written = write_hf_shards(the_plan, outputs, output_dir, file_format, names, requested, max_shard_size,
                                  f"MindSpore -> {visualglm_hf.FORMAT}")
        outputs.write_text(os.path.join(output_dir, CONFIG_FILE),
                           json.dumps(visualglm_hf.hf_config_json(config, torch_dtype), indent=2) + "\n")
        for path in tokenizer_files(tokenizer.vocab_file if tokenizer else None):
            outputs.copy(path, os.path.join(output_dir, os.path.basename(path)))
        outputs.commit()
    print(f"wrote {len(the_plan.targets)} tensors of {len(checkpoints)} MindSpore checkpoint(s) as the "
          f"{visualglm_hf.FORMAT} release in {output_dir} ({', '.join(written)}): {timer.summary(source_bytes(source))}")
    return output_dir
