"""AnnealingLR: the SAT-style learning-rate schedule of VisualGLM's finetuning (and of the old port).

With ``step`` = the optimizer's global step (0 for the first update, as in the old MindFormers port):

1. ``step <= auto_warmup_steps - 1``: ``min(lr * auto_warmup_rate, lr * step / warmup_steps)``
   (a fixed low-rate start that overrides everything else; ``auto_warmup_steps: 0`` turns it off);
2. else ``step <= warmup_steps``: ``lr * step / warmup_steps`` (linear warm-up);
3. after the warm-up, by ``decay_style``:
   cosine ``lr * (decay_ratio + (1 - decay_ratio) * (cos(pi * r) + 1) / 2)`` with
   ``r = min(1, (step - warmup_steps) / num_iters)``; linear ``lr * (num_iters - (step - warmup_steps)) / num_iters``;
   constant ``lr``.

``warmup_steps = 0`` means no warm-up: ``step / warmup_steps`` counts as +infinity, so rule 1 gives
``lr * auto_warmup_rate`` and rule 2 never applies.

Two forms: `annealing_lr` (plain Python, for tests, logs and plots) and the `AnnealingLR` cell the
optimizer calls inside the compiled train step, registered in the mindformers registry (type ``LR``),
so ``mindformers.core.lr.build_lr({"type": "AnnealingLR", ...})`` builds it.
"""
import math

import mindspore as ms
from mindspore import ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

DECAY_STYLES = ("cosine", "linear", "constant")


def check_schedule_args(learning_rate, warmup_steps, num_iters, decay_style, decay_ratio, auto_warmup_steps,
                        auto_warmup_rate):
    if decay_style not in DECAY_STYLES:
        raise ValueError(f"AnnealingLR decay_style must be one of {', '.join(DECAY_STYLES)}, got {decay_style!r}")
    if learning_rate < 0 or warmup_steps < 0 or auto_warmup_steps < 0 or auto_warmup_rate < 0:
        raise ValueError("AnnealingLR: learning_rate, warmup_steps, auto_warmup_steps and auto_warmup_rate "
                         "must not be negative")
    if num_iters <= 0:
        raise ValueError(f"AnnealingLR num_iters must be positive, got {num_iters}")
    if not 0.0 <= decay_ratio <= 1.0:
        raise ValueError(f"AnnealingLR decay_ratio must lie in [0, 1], got {decay_ratio}")


def annealing_lr(step, learning_rate, warmup_steps, num_iters, decay_style="cosine", decay_ratio=0.1,
                 auto_warmup_steps=100, auto_warmup_rate=0.05):
    """The learning rate at optimizer step `step` (see the module docstring)."""
    lr = float(learning_rate)
    ramp = math.inf if warmup_steps == 0 else lr * step / warmup_steps
    if step <= auto_warmup_steps - 1:
        return min(lr * auto_warmup_rate, ramp)
    if step <= warmup_steps:
        return ramp
    if decay_style == "cosine":
        ratio = min(1.0, (step - warmup_steps) / num_iters)
        return lr * (decay_ratio + (1.0 - decay_ratio) * (math.cos(math.pi * ratio) + 1.0) / 2.0)
    if decay_style == "linear":
        return lr * (num_iters - (step - warmup_steps)) / num_iters
    return lr


@MindFormerRegister.register(MindFormerModuleType.LR)
class AnnealingLR(LearningRateSchedule):
    """The schedule as a Cell: ``construct(global_step) -> lr`` (float32 scalar), branch-free in the graph."""

    def __init__(self, learning_rate, warmup_steps=0, num_iters=1, decay_style="cosine", decay_ratio=0.1,
                 auto_warmup_steps=100, auto_warmup_rate=0.05, **kwargs):
        super().__init__()
        kwargs.pop("total_steps", None)  # mindformers' build_lr may pass it; num_iters is ours
        if kwargs:
            raise ValueError(f"AnnealingLR: unknown argument(s) {sorted(kwargs)}")
        decay_style = str(decay_style).lower()
        check_schedule_args(learning_rate, warmup_steps, num_iters, decay_style, decay_ratio,
                            auto_warmup_steps, auto_warmup_rate)
        self.learning_rate = float(learning_rate)
        self.warmup_steps = float(warmup_steps)
        self.num_iters = float(num_iters)
        self.decay_style = decay_style
        self.decay_ratio = float(decay_ratio)
        self.auto_warmup_steps = float(auto_warmup_steps)
        self.auto_warmup_rate = float(auto_warmup_rate)
        self.args = dict(learning_rate=learning_rate, warmup_steps=warmup_steps, num_iters=num_iters,
                         decay_style=decay_style, decay_ratio=decay_ratio, auto_warmup_steps=auto_warmup_steps,
                         auto_warmup_rate=auto_warmup_rate)

    def value(self, step):
        """The Python value at `step` (the same formula as the graph)."""
        return annealing_lr(step, **self.args)

    def construct(self, global_step):
        step = global_step.astype(ms.float32)
        lr = self.learning_rate
        if self.warmup_steps > 0:
            ramp = lr * step / self.warmup_steps
        else:
            ramp = ops.fill(ms.float32, (), 3.0e38)  # "infinite": min() below picks the auto warm-up rate
        if self.decay_style == "cosine":
            ratio = ops.minimum((step - self.warmup_steps) / self.num_iters, 1.0)
            decayed = lr * (self.decay_ratio + (1.0 - self.decay_ratio) * (ops.cos(math.pi * ratio) + 1.0) / 2.0)
        elif self.decay_style == "linear":
            decayed = lr * (self.num_iters - (step - self.warmup_steps)) / self.num_iters
        else:
            decayed = ops.fill(ms.float32, (), lr)
        after_auto = ops.select(step <= self.warmup_steps, ramp, decayed)
        auto = ops.minimum(ramp, lr * self.auto_warmup_rate)
        out = ops.select(step <= self.auto_warmup_steps - 1.0, auto, after_auto)
        return out.astype(ms.float32).reshape(())


def build_lr_schedule(section):
    """The LR cell from the YAML `lr_schedule` section (a dict with `type`), through the mindformers registry."""
    from mindformers.core.lr import build_lr

    section = dict(section)
    section.setdefault("type", "AnnealingLR")
    return build_lr(section)


__all__ = ["AnnealingLR", "annealing_lr", "build_lr_schedule", "DECAY_STYLES"]
