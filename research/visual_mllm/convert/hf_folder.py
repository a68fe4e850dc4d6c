"""An HF model folder's weights: `config.json` beside `.bin` or `.safetensors` files, sharded (with an index
json) or not. Shared by every HF-format source (the VisualGLM release, Vicuna / LLaMA, Qwen)."""
import os

from .readers import ConversionError, Source, read_safetensors, read_sharded, read_torch_pickle

CONFIG_FILE = "config.json"
# the folder's files that are neither weights nor tokenizer, kept beside a conversion to be written back
KEPT_FILES = (CONFIG_FILE, "generation_config.json", "special_tokens_map.json")
# (index json, unsharded file, shard file pattern) of the two serializations
BIN = ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-{:05d}-of-{:05d}.bin")
SAFETENSORS = ("model.safetensors.index.json", "model.safetensors", "model-{:05d}-of-{:05d}.safetensors")


def config_path(path):
    """The config.json of an HF folder, or of the folder holding a weight / index file."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, CONFIG_FILE)


def find_weights(path):
    """(index json or None, weight file(s)) of an HF folder or of an index/weight file given directly."""
    if os.path.isfile(path):
        if path.endswith(".index.json"):
            return path, None
        return None, path
    for index, single, _ in (BIN, SAFETENSORS):
        if os.path.isfile(os.path.join(path, index)):
            return os.path.join(path, index), None
        if os.path.isfile(os.path.join(path, single)):
            return None, os.path.join(path, single)
    raise ConversionError(f"{path} has {CONFIG_FILE} but no {BIN[0]}, {BIN[1]}, {SAFETENSORS[0]} or {SAFETENSORS[1]}")


def _read_file(path):
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch_pickle(path)


def read_source(path):
    """The HF weights (sharded or not, .bin or .safetensors) as a Source, memory-mapped."""
    index, single = find_weights(path)
    if index is None:
        return Source(_read_file(single), [single], f"HF checkpoint {single}")
    tensors, shards = read_sharded(index, _read_file)
    return Source(tensors, shards, f"HF checkpoint {index}")
