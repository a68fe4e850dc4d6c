"""Our MindSpore cells with the weights of a transformers model of the same config, so that a section
times both frameworks on the same numbers (and can show that their outputs agree).

The weights go through key maps in the converters' form (`visual_mllm.convert.keymap` Rules: HF key(s)
-> our key(s) with a transform): the LLaMA decoder uses the package's own HF LLaMA map
(`convert/llama_hf.py`: q/k/v concatenated into `qkv`, gate/up into `mlp.gate_up`); the image tower has
no HF converter in the package, so its map (transformers' Blip2VisionModel -> EVA ViT + ln_vision) is
here.
"""
import numpy as np
from mindspore import Tensor

from visual_mllm.convert.keymap import IDENTITY, expand

# transformers Blip2VisionModel key -> ours, for a cell holding `vit` (EvaViT) and `ln_vision` (BLIP-2's
# LayerNorm after the ViT, which HF calls post_layernorm). HF already fuses the q/k/v bias (zero K third).
BLIP2_VISION_GLOBAL = [
    ("embeddings.class_embedding", "vit.cls_token", IDENTITY),
    ("embeddings.position_embedding", "vit.pos_embed", IDENTITY),
    ("embeddings.patch_embedding.{p}", "vit.patch_embed.{p}", IDENTITY),
    ("post_layernorm.{p}", "ln_vision.{p}", IDENTITY),
]
BLIP2_VISION_LAYER = [
    ("encoder.layers.{i}.layer_norm1.{p}", "vit.blocks.{i}.norm1.{p}", IDENTITY),
    ("encoder.layers.{i}.self_attn.qkv.{p}", "vit.blocks.{i}.attn.qkv.{p}", IDENTITY),
    ("encoder.layers.{i}.self_attn.projection.{p}", "vit.blocks.{i}.attn.proj.{p}", IDENTITY),
    ("encoder.layers.{i}.layer_norm2.{p}", "vit.blocks.{i}.norm2.{p}", IDENTITY),
    ("encoder.layers.{i}.mlp.fc1.{p}", "vit.blocks.{i}.mlp.fc1.{p}", IDENTITY),
    ("encoder.layers.{i}.mlp.fc2.{p}", "vit.blocks.{i}.mlp.fc2.{p}", IDENTITY),
]


def blip2_vision_rules(num_layers):
    rules = expand(BLIP2_VISION_GLOBAL)
    for i in range(num_layers):
        rules += expand(BLIP2_VISION_LAYER, i=i)
    return rules


def copy_weights(cell, rules, state_dict, prefix=""):
    """Set every parameter of `cell` from a transformers `state_dict` through `rules` (targets = `prefix` +
    our parameter name). Every parameter must be filled, with its own shape."""
    arrays = {}
    for rule in rules:
        outputs = rule.transform(*(state_dict[key] for key in rule.sources))
        for target, tensor in zip(rule.targets, outputs):
            arrays[target[len(prefix):]] = tensor.detach().float().numpy()
    params = dict(cell.parameters_and_names())
    if sorted(params) != sorted(arrays):
        raise ValueError(f"key map and {type(cell).__name__} differ: not filled "
                         f"{sorted(set(params) - set(arrays))}, unknown {sorted(set(arrays) - set(params))}")
    for name, param in params.items():
        if tuple(param.shape) != arrays[name].shape:
            raise ValueError(f"{name}: ours {tuple(param.shape)}, transformers' {arrays[name].shape}")
        param.set_data(Tensor(np.ascontiguousarray(arrays[name])))
