"""CogVLM, HF release (`THUDM/cogvlm-chat-hf`): `config.json` (remote code `CogVLMForCausalLM`) + `model-*.safetensors`
shards with their index json; no tokenizer (the release's demo loads `lmsys/vicuna-7b-v1.5`'s).

The key map is written out literally, one line per HF key. Our layouts fuse what the release keeps apart:
the adapter's `gate_proj` / `dense_h_to_4h` become `glu.gate_up` (rows [gate; h_to_4h]) and each expert's
`gate_proj` / `up_proj` become its `gate_up` (rows [gate; up]); the experts' `*_query_key_value` are already
fused [Q; K; V] (each `hidden` wide, heads contiguous, rotate-half order: no permutation). The ViT's CLS and
position tables gain a batch axis. Each layer's persistent `rotary_emb.inv_freq` buffer (bfloat16 in the real
release, float32 in the fixture) is ignored and counted: the decoder computes `1/10000^(2i/d)` in float32.

config.json -> CogVLMConfig: the LLM sizes, `rms_norm_eps`, the special ids; `vision_config` -> the EVA2-CLIP
sizes (its `num_positions` must be (image/patch)^2 + 1); the adapter width is the LLM `intermediate_size`, as the
remote code builds it. Variants the port does not implement (another activation, tied embeddings, another
template) are refused. The way back (`export_rules`) inverts the map and adds the inv_freq buffers.
"""
import os

import torch

from ..models.cogvlm import CogVLMConfig
from ..processing.cogvlm_prompt import DEFAULT_TEMPLATE
from .hf_folder import config_path, read_source  # noqa: F401 (read_source: this format's reader)
from .keymap import ADD_BATCH_AXIS, IDENTITY, Transform, expand, invert, per_layer_buffer
from .readers import ConversionError, read_json

FORMAT = "cogvlm-hf"
ARCHITECTURE = "CogVLMForCausalLM"


def concat_rows(*widths):
    """A [w0, in], B [w1, in], ... -> [w0 + w1 + ..., in]; the inverse splits at the widths."""
    return Transform(f"concat_rows{widths}", lambda *parts: (torch.cat(parts, 0),),
                     lambda t: t.split(list(widths), 0))


# ----- the key map: (HF key(s), our key, transform) -----

def global_map(adapter_inner):
    glu = concat_rows(adapter_inner, adapter_inner)
    return [
        ("model.embed_tokens.weight", "llm.embed_tokens.weight", IDENTITY),
        ("model.norm.weight", "llm.norm.weight", IDENTITY),
        ("lm_head.weight", "llm.lm_head.weight", IDENTITY),
        ("model.vision.boi", "image_encoder.boi", IDENTITY),
        ("model.vision.eoi", "image_encoder.eoi", IDENTITY),
        ("model.vision.patch_embedding.cls_embedding", "image_encoder.vit.cls_token", ADD_BATCH_AXIS),
        ("model.vision.patch_embedding.position_embedding.weight", "image_encoder.vit.pos_embed", ADD_BATCH_AXIS),
        ("model.vision.patch_embedding.proj.{p}", "image_encoder.vit.patch_embed.{p}", IDENTITY),
        ("model.vision.linear_proj.linear_proj.weight", "image_encoder.adapter.linear_proj.weight", IDENTITY),
        ("model.vision.linear_proj.norm1.{p}", "image_encoder.adapter.norm1.{p}", IDENTITY),
        (("model.vision.linear_proj.gate_proj.weight", "model.vision.linear_proj.dense_h_to_4h.weight"),
         "image_encoder.adapter.glu.gate_up.weight", glu),
        ("model.vision.linear_proj.dense_4h_to_h.weight", "image_encoder.adapter.glu.down.weight", IDENTITY),
    ]


VIT_LAYER = [
    ("model.vision.transformer.layers.{i}.input_layernorm.{p}", "image_encoder.vit.blocks.{i}.norm1.{p}", IDENTITY),
    ("model.vision.transformer.layers.{i}.attention.query_key_value.{p}", "image_encoder.vit.blocks.{i}.attn.qkv.{p}", IDENTITY),
    ("model.vision.transformer.layers.{i}.attention.dense.{p}", "image_encoder.vit.blocks.{i}.attn.proj.{p}", IDENTITY),
    ("model.vision.transformer.layers.{i}.post_attention_layernorm.{p}", "image_encoder.vit.blocks.{i}.norm2.{p}", IDENTITY),
    ("model.vision.transformer.layers.{i}.mlp.fc1.{p}", "image_encoder.vit.blocks.{i}.mlp.fc1.{p}", IDENTITY),
    ("model.vision.transformer.layers.{i}.mlp.fc2.{p}", "image_encoder.vit.blocks.{i}.mlp.fc2.{p}", IDENTITY),
]


def llm_layer(inner):
    mlp = concat_rows(inner, inner)
    return [
        ("model.layers.{i}.input_layernorm.weight", "llm.layers.{i}.input_layernorm.weight", IDENTITY),
        ("model.layers.{i}.self_attn.vision_expert_query_key_value.weight", "llm.layers.{i}.self_attn.qkv.vision.weight", IDENTITY),
        ("model.layers.{i}.self_attn.language_expert_query_key_value.weight", "llm.layers.{i}.self_attn.qkv.language.weight", IDENTITY),
        ("model.layers.{i}.self_attn.vision_expert_dense.weight", "llm.layers.{i}.self_attn.o_proj.vision.weight", IDENTITY),
        ("model.layers.{i}.self_attn.language_expert_dense.weight", "llm.layers.{i}.self_attn.o_proj.language.weight", IDENTITY),
        ("model.layers.{i}.post_attention_layernorm.weight", "llm.layers.{i}.post_attention_layernorm.weight", IDENTITY),
        (("model.layers.{i}.mlp.vision_mlp.gate_proj.weight", "model.layers.{i}.mlp.vision_mlp.up_proj.weight"),
         "llm.layers.{i}.mlp.vision.gate_up.weight", mlp),
        ("model.layers.{i}.mlp.vision_mlp.down_proj.weight", "llm.layers.{i}.mlp.vision.down.weight", IDENTITY),
        (("model.layers.{i}.mlp.language_mlp.gate_proj.weight", "model.layers.{i}.mlp.language_mlp.up_proj.weight"),
         "llm.layers.{i}.mlp.language.gate_up.weight", mlp),
        ("model.layers.{i}.mlp.language_mlp.down_proj.weight", "llm.layers.{i}.mlp.language.down.weight", IDENTITY),
    ]


ROTARY_INV_FREQ = "model.layers.{i}.self_attn.rotary_emb.inv_freq"  # persistent buffer: ignored, counted


def rules(config):
    """HF key -> our key rules for a CogVLMConfig."""
    llm, image = config.llm_config, config.image_encoder_config
    out = expand(global_map(image.adapter_intermediate_size))
    for i in range(image.vit_config.num_layers):
        out += expand(VIT_LAYER, i=i)
    for i in range(llm.num_layers):
        out += expand(llm_layer(llm.intermediate_size), i=i)
    return out


def ignored_keys(config):
    return [ROTARY_INV_FREQ.format(i=i) for i in range(config.llm_config.num_layers)]


def rotary_inv_freq(config, dtype):
    """The release's buffer: 1/10000^(arange(0, d, 2)/d) over the head dim, computed in float32."""
    d = config.llm_config.head_dim
    return (1.0 / (config.llm_config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).to(dtype)


def export_rules(config, inv_freq_dtype):
    """Our key -> HF key rules (the inverse map) plus the per-layer inv_freq buffers."""
    return invert(rules(config)) + per_layer_buffer(ROTARY_INV_FREQ, config.llm_config.num_layers,
                                                    lambda: rotary_inv_freq(config, inv_freq_dtype))


# ----- config -----

def _need(mapping, key, where):
    if key not in mapping:
        raise ConversionError(f"{where} has no {key!r}: not a cogvlm-chat-hf config.json")
    return mapping[key]


def config_from_release(hf, where, seq_length=None):
    """A CogVLMConfig from the release's config.json dict (`where` names it in errors)."""
    if ARCHITECTURE not in hf.get("architectures", []) or "vision_config" not in hf:
        raise ConversionError(f"{where}: architectures {hf.get('architectures')} / no vision_config: not a CogVLM "
                              f"(cogvlm-chat-hf) config.json ({ARCHITECTURE} expected)")
    vision = hf["vision_config"]
    refused = [(f"hidden_act {hf.get('hidden_act')!r}", hf.get("hidden_act", "silu") != "silu"),
               (f"vision_config.hidden_act {vision.get('hidden_act')!r}", vision.get("hidden_act", "gelu") != "gelu"),
               ("tie_word_embeddings true", hf.get("tie_word_embeddings", False)),
               (f"template_version {hf.get('template_version')!r}",
                hf.get("template_version", DEFAULT_TEMPLATE) != DEFAULT_TEMPLATE)]
    refused = [what for what, bad in refused if bad]
    if refused:
        raise ConversionError(f"{where}: {', '.join(refused)}: this port implements cogvlm-chat-hf as released "
                              f"(silu LLM, exact-GELU ViT, untied lm_head, template_version {DEFAULT_TEMPLATE!r})")
    image_size, patch = _need(vision, "image_size", where), _need(vision, "patch_size", where)
    positions = (image_size // patch) ** 2 + 1
    if _need(vision, "num_positions", where) != positions:
        raise ConversionError(f"{where}: vision_config.num_positions {vision['num_positions']} != "
                              f"({image_size}/{patch})^2 + 1 = {positions} (the position table has no interpolation)")
    inner = _need(hf, "intermediate_size", where)
    max_positions = hf.get("max_position_embeddings", 2048)
    return CogVLMConfig(
        image_encoder_config={
            "vit_config": {"image_size": image_size, "patch_size": patch, "in_channels": vision.get("in_channels", 3),
                           "hidden_size": _need(vision, "hidden_size", where),
                           "num_layers": _need(vision, "num_hidden_layers", where),
                           "num_heads": _need(vision, "num_heads", where),
                           "intermediate_size": _need(vision, "intermediate_size", where),
                           "norm_eps": vision.get("layer_norm_eps", 1e-6)},
            "adapter_intermediate_size": inner},
        llm_config={"vocab_size": _need(hf, "vocab_size", where), "hidden_size": _need(hf, "hidden_size", where),
                    "num_layers": _need(hf, "num_hidden_layers", where),
                    "num_heads": _need(hf, "num_attention_heads", where), "intermediate_size": inner,
                    "norm_eps": hf.get("rms_norm_eps", 1e-6), "max_position_embeddings": max_positions,
                    "bos_token_id": hf.get("bos_token_id", 1), "eos_token_id": hf.get("eos_token_id", 2),
                    "pad_token_id": hf.get("pad_token_id", 0)},
        seq_length=seq_length or max_positions)


def read_config(path, seq_length=None):
    path = config_path(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: --torch_path must be the cogvlm-chat-hf folder (config.json, "
                              f"model-*.safetensors + index)")
    return path, config_from_release(read_json(path), path, seq_length)


def hf_config_json(config, kept, torch_dtype):
    """config.json for the way back: the kept release config.json with this model's sizes and dtype."""
    llm, vit = config.llm_config, config.image_encoder_config.vit_config
    out = dict(kept)
    out.update({"vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_layers,
                "num_attention_heads": llm.num_heads, "intermediate_size": llm.intermediate_size,
                "rms_norm_eps": llm.norm_eps, "bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id,
                "pad_token_id": llm.pad_token_id, "torch_dtype": str(torch_dtype).replace("torch.", "")})
    out["vision_config"] = dict(kept.get("vision_config", {}), image_size=vit.image_size, patch_size=vit.patch_size,
                                in_channels=vit.in_channels, hidden_size=vit.hidden_size,
                                num_hidden_layers=vit.num_layers, num_heads=vit.num_heads,
                                intermediate_size=vit.intermediate_size, layer_norm_eps=vit.norm_eps,
                                num_positions=vit.num_patches + 1)
    return out
