"""LoRA on any Dense layers of a model (mindpet's LoRADense), freezing, trainable-only checkpoints and merging.

Which layers get LoRA is configuration (the `lora` section of a finetune YAML)::

    lora:
      rank: 10
      alpha: 128                 # scaling = alpha / rank
      dropout: 0.0
      layer_prefix: llm.layers   # the CellList that `layers` indexes
      layers: [0, 14]            # null = every layer
      target_modules: [attention.query_key_value, attention.dense]   # Dense paths inside a layer (suffix match);
                                 # GLM names; LLaMA / Qwen: self_attn.qkv, self_attn.o_proj, mlp.gate_up, mlp.down
      extra_targets: []          # full Dense names, wildcards allowed: image_encoder.qformer.layers.*.self_attn.query
    trainable: [image_encoder.projection.*]   # further parameters trained as they are (fnmatch on names)

Each targeted ``nn.Dense`` is replaced by a ``mindpet.delta.LoRADense`` holding the *same* weight and
bias Parameters (frozen) plus ``mindpet_delta_lora_a`` [rank, in] and ``mindpet_delta_lora_b`` [out, rank]
(B starts at zero, so the model is unchanged until trained). Parameter names keep the model's paths
(``llm.layers.0.attention.query_key_value.mindpet_delta_lora_a``). Freezing is mindpet's
``freeze_delta(model, "lora", exclude=trainable)``; the trainable count is printed and must not be zero.

A LoRA checkpoint holds the trainable parameters only, plus a JSON description of the LoRA layout
(``visual_mllm_lora`` entry), so `load_lora_checkpoint(model, path)` can rebuild the same LoRA layers on
a plain model of the same architecture. `merge_lora` folds ``W + alpha/rank * B @ A`` into each weight
and puts plain ``nn.Dense`` cells back: the model then has exactly the base parameter names, saves as
the usual split checkpoints and exports like any other.
"""
import contextlib
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..atomic import write_atomic
from ..layers import Linear, numpy_dtype
from ..lora_layout import LORA_PARAMS, META_FORMAT, META_KEY, layout_meta
from ..models.weights import save_split_checkpoints, shape_mismatches



class LoraConfigError(ValueError):
    """The LoRA settings do not fit the model (unknown layers or modules, nothing to train ...)."""


class LoraCheckpointError(ValueError):
    """A LoRA checkpoint does not fit the model it is loaded into."""


@dataclass
class LoraSettings:
    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layer_prefix: str = "llm.layers"
    layers: Optional[List[int]] = None
    target_modules: Sequence[str] = ("attention.query_key_value", "attention.dense")  # VisualGLM's reference
    extra_targets: Sequence[str] = ()
    compute_dtype: str = "float32"   # LoRADense computes in this dtype (mindpet's default fp16 is slow on CPU)

    def check(self):
        if int(self.rank) <= 0:
            raise LoraConfigError(f"lora.rank must be a positive integer, got {self.rank}")
        if float(self.alpha) == 0:
            raise LoraConfigError("lora.alpha must not be 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoraConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if self.compute_dtype not in ("float32", "float16", "bfloat16"):
            raise LoraConfigError(f"lora.compute_dtype must be float32, float16 or bfloat16, got {self.compute_dtype}")


@dataclass
class TrainableSummary:
    lora_targets: List[str]
    extra_params: List[str]
    trainable: int
    total: int
    lora_params: int = 0

    def describe(self):
        pct = 100.0 * self.trainable / max(self.total, 1)
        parts = [f"trainable parameters: {self.trainable:,} of {self.total:,} ({pct:.3f}%)"]
        if self.lora_targets:
            parts.append(f"LoRA {self.lora_params:,} in {len(self.lora_targets)} Dense layers "
                         f"({_summarise(self.lora_targets)})")
        if self.extra_params:
            parts.append(f"also trained: {_summarise(self.extra_params)}")
        return "; ".join(parts)


def _summarise(names, limit=6):
    names = list(names)
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _dtype(name):
    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


# ------------------------------------------------------------------------------------------ targets

def _is_lora(cell):
    from mindpet.delta.lora import LoRADense

    return isinstance(cell, LoRADense)


def dense_cells(model):
    """{name: cell} of every nn.Dense (LoRADense included) in the model."""
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, nn.Dense)}


def find_targets(model, settings: LoraSettings):
    """Names of the Dense cells the settings put LoRA on; errors name what did not match."""
    cells = dense_cells(model)
    targets = []
    modules = list(settings.target_modules or [])
    if modules:
        prefix = settings.layer_prefix
        layer_list = dict(model.cells_and_names()).get(prefix)
        if layer_list is None or not isinstance(layer_list, (nn.CellList, nn.SequentialCell)):
            raise LoraConfigError(f"lora.layer_prefix {prefix!r} is not a layer list of the model")
        count = len(layer_list)
        layers = list(range(count)) if settings.layers in (None, "all") else [int(i) for i in settings.layers]
        bad = [i for i in layers if not 0 <= i < count]
        if bad:
            raise LoraConfigError(f"lora.layers {bad} do not exist: {prefix} has layers 0..{count - 1}")
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
        matched = {module: 0 for module in modules}
        inside = set()
        for name in cells:
            found = pattern.match(name)
            if not found:
                continue
            inside.add(found.group(2))
            if int(found.group(1)) not in layers:
                continue
            for module in modules:
                rest = found.group(2)
                if rest == module or rest.endswith("." + module):
                    matched[module] += 1
                    targets.append(name)
                    break
        missing = [m for m, n in matched.items() if n == 0]
        if missing:
            raise LoraConfigError(f"lora.target_modules {missing} match no Dense layer in {prefix}.N; "
                                  f"the Dense layers of a layer are: {', '.join(sorted(inside))}")
    for pattern in settings.extra_targets or []:
        hits = [name for name in cells if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise LoraConfigError(f"lora.extra_targets pattern {pattern!r} matches no Dense layer of the model")
        targets += [h for h in hits if h not in targets]
    if not targets:
        raise LoraConfigError("the lora settings select no layer (empty target_modules and extra_targets)")
    already = [t for t in targets if _is_lora(cells[t])]
    if already:
        raise LoraConfigError(f"these layers already have LoRA: {_summarise(already)}")
    return targets


def _parent(model, name):
    cells = dict(model.cells_and_names())
    parent_name, _, attr = name.rpartition(".")
    return cells[parent_name] if parent_name else model, attr


def _set_child(model, name, cell):
    """Replace the child `name` and give its parameters their full names again (MindSpore renames on set)."""
    parent, attr = _parent(model, name)
    if isinstance(parent, nn.CellList) and attr.isdigit():
        parent[int(attr)] = cell
    else:
        setattr(parent, attr, cell)
    for local, param in cell.parameters_and_names():
        param.name = f"{name}.{local}"


def _forget_compiled(model):
    """Graphs compiled for generation hold the old cells: drop them (they are rebuilt on demand)."""
    if isinstance(getattr(model, "_generators", None), dict):
        model._generators.clear()  # pylint: disable=protected-access


def inject_lora(model, targets, rank, alpha, dropout=0.0, compute_dtype="float32"):
    """Replace each named Dense by a LoRADense sharing its weight/bias Parameters; returns the LoRA params."""
    from mindpet.delta.lora import LoRADense

    cells = dense_cells(model)
    quantized = [t for t in targets if getattr(cells[t], "int8", False)]
    if quantized:
        raise LoraConfigError(f"LoRA cannot go on int8 (quantised) layers: {_summarise(quantized)}; load the "
                              "model without quantize (--quantize none), or give --lora_checkpoint none")
    added = []
    for name in targets:
        old = cells[name]
        new = LoRADense(old.in_channels, old.out_channels, lora_rank=int(rank), lora_alpha=float(alpha),
                        lora_dropout=float(dropout), has_bias=old.has_bias, weight_init="zeros",
                        bias_init="zeros", param_init_type=ms.float32, compute_dtype=_dtype(compute_dtype))
        new.weight = old.weight
        if old.has_bias:
            new.bias = old.bias
        new.precision = old.precision  # what the merged layer goes back to
        _set_child(model, name, new)
        added += [new.mindpet_delta_lora_a, new.mindpet_delta_lora_b]
    _forget_compiled(model)
    return added


def lora_targets_of(model):
    """Names of the LoRADense cells in the model."""
    return [name for name, cell in dense_cells(model).items() if _is_lora(cell)]


def apply_lora(model, settings: LoraSettings, trainable_patterns=()):
    """Put LoRA on the configured layers (if enabled), freeze everything else except `trainable_patterns`.

    Returns a TrainableSummary; raises LoraConfigError when nothing would be trained.
    """
    from mindpet.graph import freeze_delta, freeze_modules

    settings.check()
    targets = find_targets(model, settings) if settings.enabled else []
    if targets:
        inject_lora(model, targets, settings.rank, settings.alpha, settings.dropout, settings.compute_dtype)
    names = [name for name, _ in model.parameters_and_names()]
    patterns = list(trainable_patterns or [])
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise LoraConfigError(f"trainable pattern {pattern!r} matches no parameter of the model "
                                  f"(parameters look like {names[0]!r})")
    with _quiet_mindpet():
        if targets:
            freeze_delta(model, "lora", exclude=patterns or None)
        else:
            freeze_modules(model, include=["*"], exclude=patterns or None)
    return summarise_trainable(model)


@contextlib.contextmanager
def _quiet_mindpet():
    """mindpet logs every freeze step at INFO level on stdout: keep the run's output readable."""
    from mindpet.log.log import logger

    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def summarise_trainable(model):
    lora_names = set(lora_targets_of(model))
    trainable = model.trainable_params()
    extra = [p.name for p in trainable if not p.name.endswith(LORA_PARAMS)]
    lora_count = sum(int(np.prod(p.shape)) for p in trainable if p.name.endswith(LORA_PARAMS))
    total = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    summary = TrainableSummary(sorted(lora_names), extra, sum(int(np.prod(p.shape)) for p in trainable), total,
                               lora_count)
    if summary.trainable == 0:
        raise LoraConfigError("no parameter is trainable: enable lora or list parameters under `trainable`")
    return summary


# -------------------------------------------------------------------------------------- checkpoints

def lora_meta(model, settings: Optional[LoraSettings] = None):
    """The layout of `model`'s LoRA layers and other trainable parameters."""
    cells = dense_cells(model)
    targets = lora_targets_of(model)
    first = cells[targets[0]] if targets else None
    trainable = [p.name for p in model.trainable_params() if not p.name.endswith(LORA_PARAMS)]
    return layout_meta(first.lora_rank if first is not None else 0, first.lora_alpha if first is not None else 0.0,
                       settings.dropout if settings is not None else 0.0, targets, trainable)


def trainable_state(model):
    """[(name, Parameter)] saved in a LoRA checkpoint: every LoRA A/B plus the other trainable parameters."""
    seen, out = set(), []
    for param in model.get_parameters():
        if (param.requires_grad or param.name.endswith(LORA_PARAMS)) and param.name not in seen:
            seen.add(param.name)
            out.append((param.name, param))
    return out


def save_lora_checkpoint(model, path, settings: Optional[LoraSettings] = None):
    """Write the trainable parameters + layout to `path` atomically (a temporary file, then a rename)."""
    meta = lora_meta(model, settings)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    records = [{"name": n, "data": p} for n, p in trainable_state(model)]
    return write_atomic(path, lambda tmp: ms.save_checkpoint(records, tmp, append_dict={META_KEY: json.dumps(meta)}))


def read_lora_checkpoint(path):
    """(meta dict, {name: numpy array}) of a LoRA checkpoint."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA checkpoint not found: {path}")
    try:
        params = ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises several types for a damaged file
        raise LoraCheckpointError(f"cannot read LoRA checkpoint {path}: {err}") from err
    meta = params.pop(META_KEY, None)
    if not isinstance(meta, str):
        raise LoraCheckpointError(f"{path} is not a visual_mllm LoRA checkpoint (no {META_KEY!r} entry); "
                                  "it must come from run_finetune.py")
    meta = json.loads(meta)
    if meta.get("format") != META_FORMAT:
        raise LoraCheckpointError(f"{path}: unsupported LoRA checkpoint format {meta.get('format')!r}")
    arrays = {name: p.asnumpy() for name, p in params.items() if hasattr(p, "asnumpy")}
    return meta, arrays


@dataclass
class LoraLoadResult:
    path: str
    targets: List[str]
    trainable: List[str]
    rank: int
    alpha: float
    merged: bool = False
    loaded: List[str] = field(default_factory=list)


def load_lora_checkpoint(model, path, merge=False):
    """Load a LoRA checkpoint written by run_finetune.py into `model` (a plain or LoRA model).

    The LoRA layers the checkpoint describes are added to the model (layers that already carry LoRA
    of the same rank are reused); every LoRA matrix and every other trained parameter in the file is
    loaded strictly: a missing, unexpected or mis-shaped entry raises LoraCheckpointError and nothing
    is changed. With `merge=True` the LoRA products are folded into the base weights afterwards (plain
    Dense layers again: fastest inference, exportable). Returns a LoraLoadResult.
    """
    meta, arrays = read_lora_checkpoint(path)
    cells = dense_cells(model)
    targets = list(meta.get("targets", []))
    unknown = [t for t in targets if t not in cells]
    if unknown:
        raise LoraCheckpointError(f"{path}: LoRA layers {_summarise(unknown)} are not Dense layers of "
                                  f"{type(model).__name__}; the checkpoint belongs to another architecture")
    rank, alpha = int(meta.get("rank", 0)), float(meta.get("alpha", 0.0))
    wrong_rank = [t for t in targets if _is_lora(cells[t]) and int(cells[t].lora_rank) != rank]
    if wrong_rank:
        raise LoraCheckpointError(f"{path}: layers {_summarise(wrong_rank)} already carry LoRA of another rank")
    params = {p.name: p for p in model.get_parameters()}
    expected = {f"{t}.{k}": (cells[t].out_channels if k.endswith("b") else rank,
                             rank if k.endswith("b") else cells[t].in_channels)
                for t in targets for k in LORA_PARAMS}
    for name in meta.get("trainable", []):
        if name not in params:
            raise LoraCheckpointError(f"{path}: trained parameter {name!r} is not a parameter of the model")
        expected[name] = tuple(params[name].shape)
    problems = shape_mismatches(expected, {n: a.shape for n, a in arrays.items()}, "missing",
                                "not described by its layout")
    if problems:
        raise LoraCheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(problems))
    fresh = [t for t in targets if not _is_lora(cells[t])]
    if fresh:
        inject_lora(model, fresh, rank, alpha, 0.0)
    params = {p.name: p for p in model.get_parameters()}
    for name, array in arrays.items():
        param = params[name]
        param.set_data(Tensor(array.astype(numpy_dtype(param.dtype))))
    _forget_compiled(model)
    result = LoraLoadResult(path, targets, list(meta.get("trainable", [])), rank, alpha, loaded=sorted(arrays))
    if merge:
        merge_lora(model)
        result.merged = True
    return result


# ------------------------------------------------------------------------------------------- merging

def merge_lora(model):
    """Fold every LoRADense into a plain Dense with W + (alpha/rank) * B @ A; returns the merged names."""
    merged = []
    for name, cell in list(dense_cells(model).items()):
        if not _is_lora(cell):
            continue
        weight = cell.weight.asnumpy().astype(np.float64)
        a = cell.mindpet_delta_lora_a.asnumpy().astype(np.float64)
        b = cell.mindpet_delta_lora_b.asnumpy().astype(np.float64)
        folded = weight + (float(cell.lora_alpha) / float(cell.lora_rank)) * (b @ a)
        plain = Linear(cell.in_channels, cell.out_channels, has_bias=cell.has_bias, precision=cell.precision)
        cell.weight.set_data(Tensor(folded.astype(numpy_dtype(cell.weight.dtype))))
        plain.weight = cell.weight
        if cell.has_bias:
            plain.bias = cell.bias
        _set_child(model, name, plain)
        merged.append(name)
    _forget_compiled(model)
    return merged


def save_merged_model(model, output_dir):
    """Merge LoRA (if any) and write the split checkpoints (ViT / Q-Former / LLM) to output_dir."""
    merge_lora(model)
    return save_split_checkpoints(model, output_dir, {part: stem + ".ckpt" for part, stem in model.split_files.items()})


def settings_from_dict(section):
    """LoraSettings from a YAML dict; unknown keys are errors."""
    section = dict(section or {})
    known = set(LoraSettings.__dataclass_fields__)  # pylint: disable=no-member
    unknown = sorted(set(section) - known)
    if unknown:
        raise LoraConfigError(f"unknown lora key(s) {unknown}; known keys: {sorted(known)}")
    return LoraSettings(**section)


__all__ = ["LoraSettings", "LoraConfigError", "LoraCheckpointError", "TrainableSummary", "LoraLoadResult",
           "apply_lora", "find_targets", "inject_lora", "load_lora_checkpoint", "save_lora_checkpoint",
           "read_lora_checkpoint", "merge_lora", "save_merged_model", "lora_targets_of", "trainable_state",
           "settings_from_dict", "summarise_trainable"]
