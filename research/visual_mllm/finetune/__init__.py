"""LoRA finetuning of every model family (VisualGLM-6B, MiniGPT-4, MiniGPT4Qwen).

The code is family-neutral: a family's training rows come from its prompt builder
(`PromptBuilder.training_sample`), its positions from its decoder's PositionScheme, and which layers get
LoRA from the YAML.

Modules, one concern each:

* `config`       - the `finetune:` section of a LoRA YAML (configs/<model>/lora.yaml), read strictly;
* `datasets`     - the three dataset formats, the validation pass, training rows, sharded batches;
* `lora`         - LoRA on configurable Dense layers (mindpet LoRADense), freezing, trainable-only
                   checkpoints, `load_lora_checkpoint`, merging LoRA into the base weights;
* `lr_schedule`  - AnnealingLR (SAT style), registered in the mindformers registry;
* `train_step`   - the loss and the compiled, portable train step (AdamW, clipping, loss scale, DP mean);
* `checkpoints`  - resumable checkpoints written atomically;
* `reporting`    - CSV log, loss-curve PNG, progress bar;
* `trainer`      - the run itself (`finetune(RunOptions)`), used by run_finetune.py;
* `demo`         - builds the learned tiny VisualGLM demo model from examples/finetune.
"""
from . import lr_schedule  # registers AnnealingLR with mindformers
from .lora import load_lora_checkpoint, merge_lora, save_lora_checkpoint

__all__ = ["load_lora_checkpoint", "merge_lora", "save_lora_checkpoint", "lr_schedule"]
