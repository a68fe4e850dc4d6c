"""How a LoRA checkpoint is laid out (a leaf module): what finetuning writes and the SAT converter writes too.

A LoRA checkpoint holds, per adapted Linear `<dense>`, mindpet's `<dense>.mindpet_delta_lora_a` (r x in)
and `<dense>.mindpet_delta_lora_b` (out x r), any other trainable parameters, and under META_KEY the JSON
of `layout_meta` (rank, alpha, dropout, the adapted modules, the other trainable parameters).
"""
META_KEY = "visual_mllm_lora"
META_FORMAT = 1
LORA_PARAMS = ("mindpet_delta_lora_a", "mindpet_delta_lora_b")


def layout_meta(rank, alpha, dropout, targets, trainable):
    """The JSON-able layout stored with a LoRA checkpoint (read back by `finetune.lora.load_lora_checkpoint`)."""
    return {"format": META_FORMAT, "rank": int(rank), "alpha": float(alpha), "dropout": float(dropout),
            "targets": list(targets), "trainable": list(trainable)}
