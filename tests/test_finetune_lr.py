"""AnnealingLR (SAT style) matches the formula of ../shared/spec/finetune.md at a grid of steps,
both as plain Python and as the graph cell built through the mindformers registry."""
import math

import numpy as np
import pytest

import visual_mllm  # noqa: F401  (registers the classes)
from visual_mllm.finetune.lr_schedule import AnnealingLR, annealing_lr, build_lr_schedule


def spec_lr(step, lr, warmup_steps, num_iters, decay_style, decay_ratio=0.1, auto_warmup_steps=100,
            auto_warmup_rate=0.05):
    """The spec's four rules, written out independently of the implementation."""
    if step <= auto_warmup_steps - 1:
        scheduled = lr * step / warmup_steps if warmup_steps else math.inf
        return min(lr * auto_warmup_rate, scheduled)
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if decay_style == "cosine":
        r = min(1.0, (step - warmup_steps) / num_iters)
        return lr * (decay_ratio + (1 - decay_ratio) * (math.cos(math.pi * r) + 1) / 2)
    if decay_style == "linear":
        return lr * (num_iters - (step - warmup_steps)) / num_iters
    return lr


CASES = [
    dict(learning_rate=1e-4, warmup_steps=6, num_iters=300, decay_style="cosine"),    # the VisualGLM-6B config
    dict(learning_rate=1e-4, warmup_steps=150, num_iters=300, decay_style="cosine"),  # warm-up past auto warm-up
    dict(learning_rate=2e-3, warmup_steps=20, num_iters=200, decay_style="linear", decay_ratio=0.2),
    dict(learning_rate=1e-3, warmup_steps=0, num_iters=50, decay_style="constant"),
    dict(learning_rate=5e-3, warmup_steps=10, num_iters=240, decay_style="cosine", auto_warmup_steps=0),
]
STEPS = [0, 1, 2, 5, 6, 7, 10, 19, 20, 21, 49, 50, 98, 99, 100, 101, 149, 150, 151, 200, 299, 306, 450, 1000]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['decay_style']}-w{c['warmup_steps']}" for c in CASES])
def test_python_formula_matches_spec(case):
    args = dict(case)
    spec_args = dict(lr=args.pop("learning_rate"), **args)
    for step in STEPS:
        assert annealing_lr(step, **case) == pytest.approx(spec_lr(step, **spec_args), rel=1e-12, abs=0)


def test_graph_cell_from_registry_matches_formula():
    import mindspore as ms
    from mindspore import Tensor

    ms.set_context(mode=ms.GRAPH_MODE)
    for case in CASES:
        cell = build_lr_schedule(dict(type="AnnealingLR", **case))
        assert isinstance(cell, AnnealingLR)
        got = np.array([float(cell(Tensor(step, ms.int32)).asnumpy()) for step in STEPS])
        want = np.array([annealing_lr(step, **case) for step in STEPS])
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12, err_msg=str(case))


def test_registered_with_mindformers_and_checked():
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    assert MindFormerRegister.get_cls(MindFormerModuleType.LR, "AnnealingLR") is AnnealingLR
    with pytest.raises(ValueError, match="decay_style"):
        AnnealingLR(1e-4, 10, 100, decay_style="exponential")
    with pytest.raises(ValueError, match="num_iters"):
        AnnealingLR(1e-4, 10, 0)
