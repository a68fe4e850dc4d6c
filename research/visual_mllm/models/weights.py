"""Loading MindSpore checkpoints into a model with exact accounting, one tensor at a time.

A model's weights may come split in several files (ViT / Q-Former / LLM, as the converter writes
them) or in one. Every key of every file must name a parameter of the model with the same shape (and
a dtype it converts from), and every parameter must be given by some file; otherwise nothing is loaded
and the error names the keys.

Memory: only the files' headers are read for these checks (`read_checkpoint`). Then each tensor is
read from its file into an array of its own, converted to its parameter's dtype when the file holds
another one, and handed to the parameter without a further copy. A model built under
`deferred_init()` (models.base does so when checkpoints are given) never makes its random initial
values, so building and loading peak at the weights as the model holds them, plus one tensor in the
file's dtype while it is converted.
"""
import contextlib
import os

import numpy as np
import mindspore as ms
from mindspore.common import dtype as mstype
from mindspore.nn.utils import no_init_parameters

from ..atomic import write_atomic
from ..layers import SCALE_SUFFIX, numpy_dtype, quantize_int8

# Which parameters each split checkpoint holds (by name prefix). The Q-Former file also carries
# ln_vision and the projection, as the older MindFormers port wrote it: it holds the image side past the
# ViT, which for CogVLM is the GLU adapter with boi / eoi (its `qformer_checkpoint` is that file).
SPLIT_PARTS = {
    "vit": ("image_encoder.vit.",),
    "qformer": ("image_encoder.ln_vision.", "image_encoder.qformer.", "image_encoder.projection.",
                "image_encoder.adapter.", "image_encoder.boi", "image_encoder.eoi"),
    "llm": ("llm.",),
}
READ_BLOCK = 1 << 30  # bytes per read() call (Linux reads at most ~2 GiB at once)


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


def deferred_init(enabled=True):
    """A context in which Parameters made from an initializer (every weight of the towers) get no data:
    each is filled once, by `load_checkpoints`. (MindSpore 2.9's no_init_parameters, which its docs
    mark deprecated after 2.9: the one place to change then.) enabled=False: an ordinary build (random
    weights made now, e.g. the seeded demo model)."""
    return no_init_parameters() if enabled else contextlib.nullcontext()


def read_checkpoint(path):
    """{name: TensorLayout (shape, dtype, byte spans)} of a .ckpt or .safetensors file, from its headers
    alone: no tensor data is read (`read_tensor` reads one)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    from ..convert.readers import ConversionError, checkpoint_layout  # the readers import this module
    try:
        return checkpoint_layout(path)
    except (ConversionError, ValueError, KeyError, TypeError, IndexError, OSError) as err:  # a corrupt header
        raise CheckpointMismatchError(f"cannot read checkpoint {path}: {err}") from err


def stored_dtype(layout):
    """The MindSpore dtype a tensor is stored in (its layout names a torch dtype)."""
    name = str(layout.dtype).replace("torch.", "")
    return getattr(ms, "bool_" if name == "bool" else name)


def conversion_problem(stored, wanted):
    """Why a tensor stored as `stored` cannot fill a parameter of dtype `wanted` (MindSpore dtypes), or
    None when it can: the same dtype, or floating dtypes both (converted, rounding when narrower).
    (Float weights into an int8 model are quantised by load_checkpoints before this applies.)"""
    if stored == wanted or (stored in mstype.float_type and wanted in mstype.float_type):
        return None
    if stored == ms.int8:
        return f"int8 (quantised) weights cannot fill the model's {wanted}: set quantize: int8 in that tower's config"
    return f"{stored} cannot be converted to the model's {wanted}"


def quantized_at_load(expected, given):
    """Names of int8 weights the checkpoint gives in floating point and without their `<name>_scale`:
    load_checkpoints quantises them (per output channel) and fills the scales itself."""
    return {name for name in set(given) & set(expected)
            if expected[name].dtype == ms.int8 and stored_dtype(given[name]) in mstype.float_type
            and name + SCALE_SUFFIX in expected and name + SCALE_SUFFIX not in given}


def read_tensor(file, path, name, layout):
    """The tensor `layout` describes, read from the open binary `file` into a new numpy array in the
    file's dtype (the concatenation of its byte spans)."""
    data = np.empty(layout.nbytes, np.uint8)
    view = memoryview(data)
    pos = 0
    for start, stop in layout.spans:
        file.seek(start)
        while start < stop:
            count = file.readinto(view[pos:pos + min(stop - start, READ_BLOCK)])
            if not count:
                raise CheckpointMismatchError(f"cannot read checkpoint {path}: {name} is truncated")
            start, pos = start + count, pos + count
    return data.view(numpy_dtype(stored_dtype(layout))).reshape(layout.shape)


def set_parameter(param, array):
    """Give `param` the values of `array`, converted to the parameter's dtype if needed (see
    `conversion_problem`); the parameter takes over the array's memory (no copy)."""
    wanted = numpy_dtype(param.dtype)
    if array.dtype != wanted:
        array = array.astype(wanted)
    param.set_data(ms.Tensor.from_numpy(np.ascontiguousarray(array)))


def load_checkpoints(model, paths):
    """Load every file of `paths` (a list) into `model`, strictly, one tensor at a time.

    All headers are read and checked first; on a mismatch nothing is loaded. Each tensor's array is
    the parameter's memory from then on (or freed once converted), so no file is ever held whole."""
    expected = {p.name: p for p in model.get_parameters()}
    given, origin = {}, {}
    for path in paths:
        for name, layout in read_checkpoint(path).items():
            if name in given:
                raise CheckpointMismatchError(f"parameter {name} is in both {origin[name]} and {path}")
            given[name], origin[name] = layout, path
    quantize = quantized_at_load(expected, given)
    scales = {name + SCALE_SUFFIX for name in quantize}
    problems = shape_mismatches({n: p.shape for n, p in expected.items() if n not in scales},
                                {n: t.shape for n, t in given.items()},
                                "missing from the checkpoint(s)", "not parameters of the model",
                                where=lambda n: f" in {origin[n]}")
    wrong = [f"{n} in {origin[n]}: {problem}" for n in set(given) & set(expected) - quantize
             if (problem := conversion_problem(stored_dtype(given[n]), expected[n].dtype))]
    if wrong:
        problems.append(f"wrong dtype: {summarise(wrong)}")
    if problems:
        raise CheckpointMismatchError(f"cannot load {', '.join(paths)} into {type(model).__name__}: "
                                      + "; ".join(problems))
    for path in paths:
        with open(path, "rb") as file:
            for name in [n for n in given if origin[n] == path]:
                array = read_tensor(file, path, name, given[name])
                if name in quantize:
                    array, scale = quantize_int8(array)
                    set_parameter(expected[name + SCALE_SUFFIX], scale)
                set_parameter(expected[name], array)


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
