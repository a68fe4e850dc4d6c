"""The CogVLM conversion jobs behind `convert_weight.py --model_type cogvlm`.

to_mindspore: the cogvlm-chat-hf folder (--torch_path: config.json + safetensors shards + index) and the Vicuna
    tokenizer folder (--tokenizer: the release ships none; its demo loads lmsys/vicuna-7b-v1.5's) -> the split
    MindSpore checkpoints (cogvlm_vit: EVA2-CLIP; cogvlm_adapter: GLU adapter + boi/eoi; cogvlm_llm; the
    embedding alone), manifest.json, run_cogvlm.yaml, the tokenizer files, and the release's config.json /
    generation_config.json kept for the way back.
to_hf: the checkpoints a run YAML names -> the release layout again (config.json, safetensors or .bin shards +
    index, generation_config.json, the tokenizer files; the remote-code .py files are not written: copy them
    from the release).

Everything that can be wrong (config, tokenizer, keys, shapes) is checked before the first tensor is read;
outputs appear only when everything is written.
"""
import json
import os

from .. import families
from ..models.cogvlm import CogVLMForConditionalGeneration
from ..tokenizers.llama import PACKAGED_VOCAB_FILE, VOCAB_FILE_NAME, VicunaTokenizer
from . import cogvlm_hf
from .engine import DTYPES
from .hf_folder import BIN, CONFIG_FILE, SAFETENSORS
from .job import (MANIFEST, Timer, apply_precision, model_parameters, output_files, part_files, planned_parts,
                  processor_error, read_yaml_checkpoints, run_yaml, run_yaml_name, source_bytes,
                  tokenizer_files, write_hf_shards, write_mindspore)
from .keymap import plan
from .readers import ConversionError, read_json
from .writers import OutputFiles

FAMILY = families.get(CogVLMForConditionalGeneration.family)
YAML_NAME = run_yaml_name(FAMILY)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# the release's small files kept beside the conversion (prefixed: the tokenizer folder has files of these names)
KEPT = {CONFIG_FILE: "release_config.json", "generation_config.json": "release_generation_config.json"}
DEFAULT_PAD = "<unk>"  # vicuna-7b-v1.5's pad token (FastChat sets pad = unk); CogVLM needs a pad id


def tokenizer_folder_files(tokenizer):
    """(vocab_file, pad_token, [files to copy]) of --tokenizer (the Vicuna folder or its tokenizer.model);
    None = the tiny tokenizer shipped in the package (used only if its ids fit the model)."""
    if tokenizer is None:
        return None, DEFAULT_PAD, []
    vocab = os.path.join(tokenizer, VOCAB_FILE_NAME) if os.path.isdir(tokenizer) else tokenizer
    if not os.path.isfile(vocab):
        raise ConversionError(f"--tokenizer: {vocab} not found (give the vicuna-7b-v1.5 folder with tokenizer.model)")
    vocab = os.path.abspath(vocab)
    special = os.path.join(os.path.dirname(vocab), SPECIAL_TOKENS_MAP)
    pad = DEFAULT_PAD
    copies = tokenizer_files(VicunaTokenizer, vocab)
    if os.path.isfile(special):
        pad = read_json(special).get("pad_token") or DEFAULT_PAD
        pad = pad["content"] if isinstance(pad, dict) else pad
        copies.append(special)
    return vocab, pad, copies


def to_mindspore(torch_path, output_dir, dtype="auto", file_format="ckpt", tokenizer=None, quantize=None,
                 seq_length=None):
    """Convert the cogvlm-chat-hf folder into output_dir; returns the path of the run YAML written there."""
    timer = Timer()
    output_dir = os.path.abspath(output_dir)
    if not os.path.exists(torch_path):
        raise ConversionError(f"--torch_path {torch_path} does not exist")
    config_file, config = cogvlm_hf.read_config(torch_path, seq_length)
    vocab, pad, copies = tokenizer_folder_files(tokenizer)
    source = cogvlm_hf.read_source(os.path.dirname(config_file))
    model_cls = FAMILY.model_class
    expected, embedding = model_parameters(model_cls, config)
    the_plan = plan(source, cogvlm_hf.rules(config), cogvlm_hf.ignored_keys(config), expected,
                    f"{source.description} (sizes from {config_file})")
    files = output_files(output_dir, file_format, part_files(model_cls), {}, planned_parts(the_plan, embedding))
    the_plan, precision = apply_precision(config, model_cls, the_plan, dtype, quantize)
    data = run_yaml(FAMILY, config, files, {"vocab_file": vocab, "pad_token": pad})
    err = processor_error(data)
    if err is not None:
        if vocab is None:
            raise ConversionError(f"the release has no tokenizer and the tiny one shipped with visual_mllm does not "
                                  f"fit this model ({err}): pass --tokenizer /path/to/vicuna-7b-v1.5")
        raise ConversionError(f"the tokenizer {vocab} (--tokenizer) does not fit the model: {err}")
    if vocab is not None:
        data["processor"]["tokenizer"]["vocab_file"] = os.path.join(output_dir, VOCAB_FILE_NAME)
    copies = [(path, os.path.join(output_dir, os.path.basename(path))) for path in copies]
    folder = os.path.dirname(config_file)
    copies += [(os.path.join(folder, name), os.path.join(output_dir, kept)) for name, kept in KEPT.items()
               if os.path.isfile(os.path.join(folder, name))]
    yaml_path = os.path.join(output_dir, YAML_NAME)
    header = [f"CogVLM converted by convert_weight.py from {folder} ({cogvlm_hf.FORMAT}).",
              f"Sizes from {config_file}; see {MANIFEST} beside this file for the sources and outputs.",
              f"python run_infer.py --config {yaml_path} --image_path IMG --prompt \"...\""]
    extra = {"tokenizer": {"vocab_file": vocab, "pad_token": pad,
                           "from": "--tokenizer" if vocab else "visual_mllm's packaged tiny tokenizer"}, **precision}
    write_mindspore(the_plan, cogvlm_hf.FORMAT, files, embedding, (yaml_path, data, header), timer, dtype,
                    file_format, copies, extra)
    return yaml_path


def to_hf(config_yaml, output_dir, dtype="auto", file_format="safetensors", max_shard_size=5 * 10 ** 9):
    """Write the weights a run YAML names in the cogvlm-chat-hf layout into output_dir."""
    timer = Timer()
    run_config, config, checkpoints, source = read_yaml_checkpoints(config_yaml, FAMILY)
    requested = DTYPES[dtype]
    embedding_dtype = source["llm.embed_tokens.weight"].dtype
    torch_dtype = requested if requested is not None else embedding_dtype
    the_plan = plan(source, cogvlm_hf.export_rules(config, torch_dtype), (), None,
                    f"{source.description} ({config_yaml})")
    tokenizer = run_config.processor.tokenizer if run_config.processor else None
    vocab = tokenizer.vocab_file if tokenizer else None
    here = os.path.dirname(os.path.abspath(config_yaml))
    kept = {name: os.path.join(here, kept) for name, kept in KEPT.items() if os.path.isfile(os.path.join(here, kept))}
    release_config = read_json(kept[CONFIG_FILE]) if CONFIG_FILE in kept else {
        "architectures": [cogvlm_hf.ARCHITECTURE], "template_version": "chat", "hidden_act": "silu",
        "tie_word_embeddings": False, "vision_config": {"hidden_act": "gelu"}}
    names = SAFETENSORS if file_format == "safetensors" else BIN
    with OutputFiles() as outputs:
        written = write_hf_shards(the_plan, outputs, output_dir, file_format, names, requested, max_shard_size,
                                  f"MindSpore -> {cogvlm_hf.FORMAT}")
        outputs.write_text(os.path.join(output_dir, CONFIG_FILE),
                           json.dumps(cogvlm_hf.hf_config_json(config, release_config, torch_dtype), indent=2) + "\n")
        if "generation_config.json" in kept:
            outputs.copy(kept["generation_config.json"], os.path.join(output_dir, "generation_config.json"))
        if vocab and os.path.abspath(vocab) != os.path.abspath(PACKAGED_VOCAB_FILE):
            tokenizer_dir = os.path.join(output_dir, "tokenizer")
            for path in tokenizer_files(VicunaTokenizer, vocab) + [
                    p for p in [os.path.join(os.path.dirname(vocab), SPECIAL_TOKENS_MAP)] if os.path.isfile(p)]:
                outputs.copy(path, os.path.join(tokenizer_dir, os.path.basename(path)))
        outputs.commit()
    print(f"wrote {len(the_plan.targets)} tensors of {len(checkpoints)} MindSpore checkpoint(s) as the "
          f"{cogvlm_hf.FORMAT} release in {output_dir} ({', '.join(written)}): {timer.summary(source_bytes(source))}")
    return output_dir
