"""Key maps: rules from source keys to target keys, their transforms, and strict accounting.

A Rule turns the tensors of some source keys into the tensors of some target keys with a named
Transform: one to one (a rename), one to many (a fused qkv split into q, k, v), many to one (LoRA
merged into its base weight) or none to one (a buffer computed from the config). A format module
writes its map as literal templates, one line per key, expanded over layers with `expand`.

`plan` checks a map against a source before any tensor is read: every source key is used by a rule
or explicitly ignored, every expected target is filled exactly once, and every target gets its
expected shape. Shapes are found by running each transform on data-less "meta" tensors, so the
check is the same code as the conversion.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .readers import ConversionError, names

WEIGHT_BIAS = ("weight", "bias")


class Transform:
    """A named function of torch tensors: forward(*sources) -> tuple of targets; `inverse` undoes it."""

    def __init__(self, name: str, forward: Callable, inverse: Optional[Callable] = None):
        self.name = name
        self.forward = forward
        self.inverse = inverse

    def __call__(self, *tensors):
        return tuple(self.forward(*tensors))

    def __repr__(self):
        return self.name


IDENTITY = Transform("identity", lambda t: (t,), lambda t: (t,))
ADD_BATCH_AXIS = Transform("add_batch_axis", lambda t: (t[None],), lambda t: (t[0],))


def split_rows(parts):
    """[A; B; ...] (stacked along dim 0) -> A, B, ...; inverse: stack them again."""
    def forward(t):
        if t.shape[0] % parts:
            raise ValueError(f"cannot split {t.shape[0]} rows into {parts} equal blocks")
        return t.chunk(parts, 0)
    return Transform(f"split_rows({parts})", forward, lambda *ts: (torch.cat(ts, 0),))


def interleaved_heads_to_blocks(heads, parts=3):
    """Rows per head [q_h; k_h; v_h] for h = 0..heads-1  ->  [Q (all heads); K; V].

    The row axis is viewed as (heads, parts, head_dim) and the first two axes swapped; the inverse
    swaps them back. Works for a weight (rows x columns) and a bias (rows).
    """
    def swap(t, first, second):
        rest = t.shape[1:]
        return t.reshape(first, second, -1, *rest).transpose(0, 1).reshape(t.shape)
    return Transform(f"interleaved_heads_to_blocks(heads={heads})",
                     lambda t: (swap(t, heads, parts),), lambda t: (swap(t, parts, heads),))


def merge_lora(partition, scaling):
    """SAT LoRA: original W (out, in), A_i (r, in), B_i (out/partition, r) -> W + scaling * [B_0 A_0; B_1 A_1; ...].

    Computed in float32, returned in W's dtype (as SAT's own merge does).
    """
    def forward(weight, *lora):
        a, b = lora[:partition], lora[partition:]
        delta = torch.cat([bi.float() @ ai.float() for ai, bi in zip(a, b)], 0)
        return ((weight.float() + scaling * delta).to(weight.dtype),)
    return Transform(f"merge_lora(partition={partition}, scaling={scaling:g})", forward)


def lora_a_as_one(partition, slots):
    """SAT A_0..A_{p-1} (r, in) -> one LoRA A (slots*r, in): stacked, zero rows for the slots past p."""
    def forward(*a):
        return (torch.cat(list(a) + [torch.zeros_like(a[0])] * (slots - partition), 0),)
    return Transform(f"lora_a_as_one(partition={partition}, slots={slots})", forward)


def lora_b_as_one(partition, slots):
    """SAT B_0..B_{p-1} (out/p, r) -> one LoRA B (out, slots*r): block-diagonal, zero columns past p.

    With lora_a_as_one, B A = [B_0 A_0; B_1 A_1; ...] exactly: the p adapters act as one of rank slots*r.
    """
    def forward(*b):
        diagonal = torch.block_diag(*b)
        padding = b[0].new_zeros((diagonal.shape[0], b[0].shape[1] * (slots - partition)))
        return (torch.cat([diagonal, padding], 1),)
    return Transform(f"lora_b_as_one(partition={partition}, slots={slots})", forward)


def constant(name, make):
    """A target computed from the config alone (no source keys)."""
    return Transform(name, lambda: (make(),))


def per_layer_buffer(key, num_layers, make):
    """Rules writing the buffer `make()` (computed from the config) under `key` ({i}: the layer) of every layer."""
    buffer = constant(key.rsplit(".", 1)[-1], make)
    return [rule for i in range(num_layers) for rule in expand([((), key, buffer)], i=i)]


@dataclass(frozen=True)
class Rule:
    sources: Tuple[str, ...]
    targets: Tuple[str, ...]
    transform: Transform

    def __str__(self):
        return f"{', '.join(self.sources) or '(config)'} -> {', '.join(self.targets)} [{self.transform}]"


def _as_tuple(keys):
    return (keys,) if isinstance(keys, str) else tuple(keys)


def expand(templates, **fields):
    """Concrete Rules from (source(s), target(s), transform) templates.

    Templates use `{p}` for weight/bias (the line then stands for both) and any `fields` (`{i}` ...).
    """
    rules = []
    for sources, targets, transform in templates:
        sources, targets = _as_tuple(sources), _as_tuple(targets)
        uses_p = any("{p}" in key for key in sources + targets)
        for p in (WEIGHT_BIAS if uses_p else (None,)):
            rules.append(Rule(tuple(key.format(p=p, **fields) for key in sources),
                              tuple(key.format(p=p, **fields) for key in targets), transform))
    return rules


def invert(rules):
    """The rules of the opposite direction (targets -> sources), each with its transform's inverse."""
    inverted = []
    for rule in rules:
        if rule.transform.inverse is None or not rule.sources:
            raise ValueError(f"rule has no inverse: {rule}")
        inverted.append(Rule(rule.targets, rule.sources,
                             Transform(f"inverse of {rule.transform.name}", rule.transform.inverse)))
    return inverted


@dataclass(frozen=True)
class Step:
    """A rule with what planning found: the output shapes/dtypes (meta tensors) and the bytes it reads."""

    rule: Rule
    outputs: Tuple[torch.Tensor, ...]


class Plan:
    """Rules checked against a source, in the order the source's files hold their first inputs."""

    def __init__(self, source, steps, ignored, exact_dtype=frozenset()):
        self.source = source
        self.steps = steps
        self.ignored = sorted(ignored)
        self.exact_dtype = frozenset(exact_dtype)  # targets written in their own dtype, whatever --dtype says

    @property
    def targets(self):
        """{target: meta tensor} in conversion order."""
        return {name: meta for step in self.steps for name, meta in zip(step.rule.targets, step.outputs)}

    @property
    def used_keys(self):
        return {key for step in self.steps for key in step.rule.sources}


def plan(source, rules, ignored, expected, what):
    """Check `rules` against `source` ({key: SourceTensor}) without reading data; return a Plan.

    ignored: source keys that are deliberately not converted (buffers, unused tables); they may be
        absent. expected: {target: shape} the targets must be exactly (the model's parameters), or
        None when any targets will do (writing a release format, checked by reading it back).
    Everything wrong is gathered and raised as one ConversionError: source keys neither used nor
    ignored, keys the map needs but the source lacks, targets filled twice, expected targets not
    filled or filled with the wrong shape, targets that are not expected.
    """
    needed = {key for rule in rules for key in rule.sources}
    absent = needed - set(source)
    unused = set(source) - needed - set(ignored)
    problems = []
    if absent:
        problems.append(f"missing keys {names(absent)}")
    if unused:
        problems.append(f"unexpected keys {names(unused)}")
    filled, steps, wrong = {}, [], []
    for rule in rules:
        for target in rule.targets:
            if target in filled:
                problems.append(f"the key map fills {target} twice ({filled[target]}; {rule})")
            filled[target] = rule
        if any(key in absent for key in rule.sources):
            continue
        try:
            outputs = rule.transform(*(source[key].meta() for key in rule.sources))
        except (RuntimeError, ValueError) as err:
            shapes = ", ".join(f"{key} {list(source[key].shape)}" for key in rule.sources)
            wrong.append(f"{shapes}: {rule.transform} fails ({str(err).splitlines()[0]})")
            continue
        for target, out in zip(rule.targets, outputs):
            shape = None if expected is None else expected.get(target)
            if shape is not None and tuple(out.shape) != tuple(shape):
                origin = ", ".join(f"{key} {list(source[key].shape)}" for key in rule.sources)
                wrong.append(f"{target} needs {list(shape)} but gets {list(out.shape)} from {origin}")
        steps.append(Step(rule, outputs))
    not_filled = set() if expected is None else set(expected) - set(filled)
    not_expected = set() if expected is None else set(filled) - set(expected)
    if not_filled:
        problems.append(f"nothing fills {names(not_filled)}")
    if not_expected:
        problems.append(f"the key map makes keys the model does not have: {names(not_expected)}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:6])}" + (f" ... and {len(wrong) - 6} more" if len(wrong) > 6 else ""))
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
    order = {key: index for index, key in enumerate(source)}
    steps.sort(key=lambda step: min((order[key] for key in step.rule.sources), default=len(order)))
    return Plan(source, steps, set(source) - needed)
