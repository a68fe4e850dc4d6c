"""Loading MindSpore checkpoints into a model with exact accounting.

A model's weights may come split in several files (ViT / Q-Former / LLM, as the converter writes
them) or in one. Every key of every file must name a parameter of the model with the same shape, and
every parameter must be given by some file; otherwise nothing is loaded and the error names the keys.
"""
import os

import mindspore as ms

from ..atomic import write_atomic

# Which parameters each split checkpoint holds (by name prefix). The Q-Former file also carries
# ln_vision and the projection, as the older MindFormers port wrote it.
SPLIT_PARTS = {
    "vit": ("image_encoder.vit.",),
    "qformer": ("image_encoder.ln_vision.", "image_encoder.qformer.", "image_encoder.projection."),
    "llm": ("llm.",),
}


class CheckpointMismatchError(ValueError):
    """Checkpoint keys and model parameters do not correspond one to one."""


def summarise(keys, limit=10):
    """'a, b, c ... and N more' of sorted keys, for error messages."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def shape_mismatches(expected, given, missing_label, unexpected_label, where=lambda name: ""):
    """Problems (strings) between expected {name: shape} and given {name: shape}; [] when they match.

    where(name) may say where a given entry came from (e.g. " in file.ckpt").
    """
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    wrong = [f"{n} {tuple(given[n])}{where(n)} != model {tuple(expected[n])}"
             for n in set(given) & set(expected) if tuple(given[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"{missing_label}: {summarise(missing)}")
    if unexpected:
        problems.append(f"{unexpected_label}: {summarise(unexpected)}")
    if wrong:
        problems.append(f"wrong shape: {summarise(wrong)}")
    return problems


def read_checkpoint(path):
    """name -> numpy array of a .ckpt or .safetensors file written by MindSpore."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        params = ms.load_checkpoint(path, format="safetensors" if path.endswith(".safetensors") else "ckpt")
    except Exception as err:  # MindSpore raises several types for a corrupt file
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {err}") from err
    return {name: p.asnumpy() for name, p in params.items()}


def load_checkpoints(model, paths):
    """Load every file of `paths` (a list) into `model`, strictly."""
    expected = {p.name: p for p in model.get_parameters()}
    given, origin = {}, {}
    for path in paths:
        for name, array in read_checkpoint(path).items():
            if name in given:
                raise CheckpointMismatchError(f"parameter {name} is in both {origin[name]} and {path}")
            given[name], origin[name] = array, path
    problems = shape_mismatches({n: p.shape for n, p in expected.items()}, {n: a.shape for n, a in given.items()},
                                "missing from the checkpoint(s)", "not parameters of the model",
                                where=lambda n: f" in {origin[n]}")
    if problems:
        raise CheckpointMismatchError(f"cannot load {', '.join(paths)} into {type(model).__name__}: "
                                      + "; ".join(problems))
    for name, param in expected.items():
        param.set_data(ms.Tensor(given[name].astype(ms.dtype_to_nptype(param.dtype))))


def split_state(model):
    """{part: {name: Parameter}} following SPLIT_PARTS; every parameter lands in exactly one part."""
    parts = {part: {} for part in SPLIT_PARTS}
    for param in model.get_parameters():
        owners = [part for part, prefixes in SPLIT_PARTS.items() if param.name.startswith(prefixes)]
        if len(owners) != 1:
            raise CheckpointMismatchError(f"parameter {param.name} belongs to no split checkpoint part")
        parts[owners[0]][param.name] = param
    return parts


def save_split_checkpoints(model, output_dir, file_names):
    """Write each part's parameters to output_dir/file_names[part] atomically; returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for part, params in split_state(model).items():
        records = [{"name": n, "data": p} for n, p in params.items()]
        paths[part] = write_atomic(os.path.join(output_dir, file_names[part]),
                                   lambda tmp, records=records: ms.save_checkpoint(records, tmp))
    return paths
