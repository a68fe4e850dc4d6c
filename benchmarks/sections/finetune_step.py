"""LoRA finetuning train steps (one process): the compiled step of `visual_mllm.finetune.train_step`
(forward, loss, gradients of the trainable parameters, clipping, AdamWeightDecay update), fp32, CPU.

Two models: the tiny demo VisualGLM with the demo's LoRA layout (configs/visualglm_tiny/lora.yaml, batch 3
of the examples/finetune rows, 128 tokens), and a mid-size GLM with the VisualGLM-6B reference layout
(LoRA rank 10 on query_key_value and dense of two layers) on one 320-token sample, the reference
training length. Rows per model: step time (median) and samples/s = batch / step time.
"""
import os
from dataclasses import dataclass

from ..common import Row, Section, Settings, time_call

TITLE = "LoRA finetune train step (forward + backward + AdamW), one process, fp32"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_LORA = os.path.join(REPO, "configs", "visualglm_tiny", "lora.yaml")


@dataclass
class Mid:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    inner_hidden_size: int
    seq: int


FULL = Mid(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, inner_hidden_size=4096, seq=320)
QUICK = Mid(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, inner_hidden_size=1024, seq=320)


def build_step(config_path, lora, trainable, dataset_overrides=None, batch_size=1, **model_overrides):
    """(train step, batch tensors, global batch) for the finetune YAML with the given LoRA layout."""
    import mindspore as ms
    from mindspore import Tensor

    import visual_mllm
    from visual_mllm.finetune.config import load_finetune_config
    from visual_mllm.finetune.datasets import BATCH_KEYS, BatchSource, load_dataset
    from visual_mllm.finetune.lora import apply_lora
    from visual_mllm.finetune.lr_schedule import build_lr_schedule
    from visual_mllm.finetune.train_step import LossNet, TrainStep, build_optimizer

    _, cfg = load_finetune_config(config_path)
    for key, value in (dataset_overrides or {}).items():
        setattr(cfg.dataset, key, value)
    model, processor = visual_mllm.load_from_yaml(config_path, **model_overrides)
    data = load_dataset(cfg.dataset, processor)
    ms.set_seed(0)
    summary = apply_lora(model, lora, trainable)
    loss_net = LossNet(model)
    loss_net.set_train(True)
    optimizer = build_optimizer(model.trainable_params(), build_lr_schedule(cfg.lr_args(1000)))
    step = TrainStep(loss_net, optimizer, grad_clip=1.0)
    source = BatchSource(data, processor, model.llm.positions, cfg.dataset, batch_size, seed=0)
    batch = source.batch(0)
    return step, [Tensor(batch[k]) for k in BATCH_KEYS], batch_size, summary.trainable


def run(settings: Settings) -> Section:
    from visual_mllm.finetune.config import load_finetune_config
    from visual_mllm.finetune.lora import LoraSettings

    section = Section("finetune_step")
    reps = settings.reps if not settings.quick else 3
    _, cfg = load_finetune_config(TINY_LORA)
    mid = QUICK if settings.quick else FULL
    reference = LoraSettings(rank=10, alpha=128.0, layers=[0, mid.num_layers - 1],
                             target_modules=["attention.query_key_value", "attention.dense"])
    cases = [
        ("tiny VisualGLM, demo LoRA", dict(lora=cfg.lora, trainable=cfg.trainable, batch_size=cfg.runner.batch_size),
         "configs/visualglm_tiny/lora.yaml layout; 128 tokens"),
        (f"GLM h{mid.hidden_size} x{mid.num_layers}, reference LoRA",
         dict(lora=reference, trainable=[], batch_size=1,
              dataset_overrides={"max_source_length": 64, "max_target_length": mid.seq - 64},
              llm_config={"vocab_size": mid.vocab_size, "hidden_size": mid.hidden_size,
                          "num_layers": mid.num_layers, "num_heads": mid.num_heads,
                          "inner_hidden_size": mid.inner_hidden_size, "max_sequence_length": 2048}),
         f"rank 10 on qkv+dense of layers 0 and {mid.num_layers - 1}; vocab {mid.vocab_size}; {mid.seq} tokens"),
    ]
    for name, kwargs, note in cases:
        step, inputs, batch, trainable = build_step(TINY_LORA, **kwargs)

        def call(step=step, inputs=inputs):
            loss, _, _ = step(*inputs)
            loss.asnumpy()

        timing = time_call(call, reps, warmup=settings.warmup)
        section.rows.append(Row.timed(f"train step, {name}, batch {batch}", timing, "ms",
                                      f"{note}; {trainable:,} trainable; first call {timing.first_s:.1f} s"))
        section.rows.append(Row(f"train samples/s, {name}, batch {batch}", batch / timing.median_s, "samples/s",
                                None, "batch / median step time"))
    section.notes.append("One process. The optimizer state and weights change every call (real steps); the "
                         "data-parallel rows (2 msrun workers) come with run_singlenode.sh.")
    return section
