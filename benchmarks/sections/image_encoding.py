"""Image encoding at the real EVA ViT-g width: visual_mllm's EvaViT + ln_vision (MindSpore graph mode, fp32)
against transformers' Blip2VisionModel of the same config with the same weights (its post_layernorm is
BLIP-2's ln_vision), in the same process on the same threads, at batch 1 and 4. Fewer blocks than the
released 39, so that a run stays short: the time of a block is the same in a deeper tower.
"""
from collections import OrderedDict

import numpy as np

from ..common import Row, Section, Settings, time_call

TITLE = "Image encoding: MindSpore EVA ViT-g width vs transformers Blip2VisionModel (same config and weights)"

BATCHES = (1, 4)

# EvaViTConfig arguments. Full: ViT-g/14's width, heads and MLP at 224 px, 4 of its 39 blocks.
FULL = dict(image_size=224, patch_size=14, hidden_size=1408, num_layers=4, num_heads=16, intermediate_size=6144)
# --quick: one block on a 112 px image (65 tokens).
QUICK = dict(FULL, image_size=112, num_layers=1)


def models(config):
    """(ours: pixel_values [B,3,H,W] -> ln_vision(EvaViT(pixel_values)) [B,N+1,D], the image encoder's first
    two cells; transformers Blip2VisionModel with the same weights) for an EvaViTConfig."""
    import torch
    import transformers
    from mindspore import nn
    from visual_mllm.layers import LayerNorm
    from visual_mllm.vision.eva_vit import EvaViT
    from visual_mllm.vision.image_encoder import ImageEncoderConfig

    from ..hf_weights import blip2_vision_rules, copy_weights

    ln_vision_eps = ImageEncoderConfig(vit_config=config).ln_vision_eps  # BLIP-2's; the blocks' is EVA's 1e-6
    torch.manual_seed(0)
    hf = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads, image_size=config.image_size,
        patch_size=config.patch_size, layer_norm_eps=config.norm_eps, qkv_bias=True,
        initializer_range=0.02)).eval()  # HF's default 1e-10 would make every token nearly the same
    hf.post_layernorm.eps = ln_vision_eps  # HF reuses the blocks' eps for it
    ours = nn.SequentialCell(OrderedDict(vit=EvaViT(config), ln_vision=LayerNorm(config.hidden_size, ln_vision_eps)))
    ours.set_train(False)
    copy_weights(ours, blip2_vision_rules(config.num_layers), hf.state_dict())
    return ours, hf


def run(settings: Settings) -> Section:
    import mindspore as ms
    import torch
    from visual_mllm.vision.eva_vit import EvaViTConfig

    config = EvaViTConfig(**(QUICK if settings.quick else FULL))
    section = Section("image_encoding")
    section.config.append(
        f"- image_encoding model: EVA ViT {config.image_size} px / patch {config.patch_size} "
        f"({config.num_patches + 1} tokens), hidden {config.hidden_size}, {config.num_layers} blocks, "
        f"{config.num_heads} heads, MLP {config.intermediate_size}, + ln_vision; fp32; batch "
        f"{', '.join(map(str, BATCHES))}")
    ours, hf = models(config)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((max(BATCHES), 3, config.image_size, config.image_size)).astype(np.float32)
    ms_res, pt_res, differences = {}, {}, []
    for batch in BATCHES:
        ms_pixels = ms.Tensor(pixels[:batch])
        pt_pixels = torch.from_numpy(pixels[:batch])

        def run_ours():
            return ours(ms_pixels).asnumpy()

        def run_theirs():
            with torch.inference_mode():
                return hf(pixel_values=pt_pixels).last_hidden_state.numpy()

        ms_res[batch] = time_call(run_ours, settings.slow_reps, settings.warmup)
        pt_res[batch] = time_call(run_theirs, settings.slow_reps, settings.warmup)
        differences.append(float(np.max(np.abs(run_ours() - run_theirs()))))

    add = section.rows.append
    for batch in BATCHES:
        t = ms_res[batch]
        add(Row.timed(f"MS ViT + ln_vision, batch {batch}", t, "ms",
                      f"EvaViT + ln_vision (LayerNorm) in graph mode; first call {t.first_s:.2f} s"))
        add(Row.timed(f"PT Blip2VisionModel, batch {batch}", pt_res[batch], "ms", "last_hidden_state"))
    for batch in BATCHES:
        add(Row(f"MS / PT image encoding, batch {batch}", ms_res[batch].median_s / pt_res[batch].median_s, "x",
                None, "same config and weights; > 1: MindSpore slower"))
    section.notes += [
        "MS = visual_mllm.vision.eva_vit.EvaViT (patch embedding as one matmul, exact GELU) followed by "
        "ln_vision, in graph mode; PT = transformers Blip2VisionModel (sdpa attention) under "
        f"torch.inference_mode(), its post_layernorm eps set to ln_vision's {hf.post_layernorm.eps:g} (blocks: "
        f"{config.norm_eps:g}). fp32, the "
        "same random weights (HF's init with std 0.02, copied into ours), random pixels. Outputs agree to "
        f"max |diff| {max(differences):.1e}.",
        "The Q-Former (32 queries) and the projection, which follow in the chat models, are not timed here "
        "(see chat_inference).",
    ]
    return section
