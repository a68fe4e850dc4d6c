"""LoRA finetuning of the VisualGLM family (MiniGPT-4 / MiniGPT4Qwen reuse the same pieces).

Modules, one concern each:

* `config`       - the `finetune:` section of a LoRA YAML (configs/<model>/lora.yaml), read strictly;
* `datasets`     - the three dataset formats, the validation pass, sample construction, sharded batches;
* `lora`         - LoRA on configurable Dense layers (mindpet LoRADense), freezing, trainable-only
                   checkpoints, `load_lora_checkpoint`, merging LoRA into the base weights;
* `lr_schedule`  - AnnealingLR (SAT style), registered in the mindformers registry;
* `train_step`   - the loss and the compiled, portable train step (AdamW, clipping, loss scale, DP mean);
* `checkpoints`  - resumable checkpoints written atomically;
* `reporting`    - CSV log, loss-curve PNG, progress bar;
* `trainer`      - the run itself (`finetune(RunOptions)`), used by run_finetune.py;
* `demo`         - builds the learned tiny demo model from examples/finetune.
"""
from . import lr_schedule  # registers AnnealingLR with mindformers
from .lora import load_lora_checkpoint, merge_lora, save_lora_checkpoint

__all__ = ["load_lora_checkpoint", "merge_lora", "save_lora_checkpoint", "lr_schedule"]
