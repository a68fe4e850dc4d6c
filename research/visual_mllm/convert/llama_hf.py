"""Vicuna / LLaMA as an HF folder (`LlamaForCausalLM.save_pretrained`), the LLM of MiniGPT-4 (--llm_path).

Files: `config.json`, `pytorch_model-*.bin` or `model-*.safetensors` shards with their index json (or
one unsharded file), `tokenizer.model` (+ `tokenizer_config.json`).

The key map is written out literally, one line per HF key. Our decoder fuses q/k/v into `qkv` (rows
[Q; K; V]; HF's q/k rows are already in the rotate-half order our rotary uses) and gate/up into
`mlp.gate_up` (rows [gate; up]). transformers <= 4.30 also saves each layer's `rotary_emb.inv_freq`
buffer: ignored (recomputed in fp32).

config.json -> LlamaConfig: the sizes, `rms_norm_eps`, `rope_theta`, `max_position_embeddings` (early
conversions call it `max_sequence_length`), grouped-query `num_key_value_heads`. The special ids come
from the tokenizer, which the prompts are built with (BOS, EOS; pad = unk: LLaMA has no pad piece and
only the position of a pad id matters); config.json's are not read (early LLaMA conversions carry
wrong ones). Variants the decoder does not implement (rope_scaling, biases, tied embeddings, another
activation) are refused.
"""
import torch

from ..llm.llama import LlamaConfig
from ..tokenizers.llama import VicunaTokenizer
from .keymap import IDENTITY, Transform, expand
from .readers import ConversionError

FORMAT = "hf-llama"
MODEL_TYPE = "llama"  # config.json's model_type
WHAT = "an HF LLaMA / Vicuna folder (config.json, weights, tokenizer.model)"
TOKENIZER = VicunaTokenizer

# A [rows_a, in], B [rows_b, in], ... -> [rows_a + rows_b + ..., in]
CONCAT_ROWS = Transform("concat_rows", lambda *parts: (torch.cat(parts, 0),))

# ----- the key map: (HF key(s), our key, transform) -----

GLOBAL = [
    ("model.embed_tokens.weight", "llm.embed_tokens.weight", IDENTITY),
    ("model.norm.weight", "llm.norm.weight", IDENTITY),
    ("lm_head.weight", "llm.lm_head.weight", IDENTITY),
]
LAYER = [
    ("model.layers.{i}.input_layernorm.weight", "llm.layers.{i}.input_layernorm.weight", IDENTITY),
    (("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"), "llm.layers.{i}.self_attn.qkv.weight", CONCAT_ROWS),
    ("model.layers.{i}.self_attn.o_proj.weight", "llm.layers.{i}.self_attn.o_proj.weight", IDENTITY),
    ("model.layers.{i}.post_attention_layernorm.weight", "llm.layers.{i}.post_attention_layernorm.weight", IDENTITY),
    (("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
     "llm.layers.{i}.mlp.gate_up.weight", CONCAT_ROWS),
    ("model.layers.{i}.mlp.down_proj.weight", "llm.layers.{i}.mlp.down.weight", IDENTITY),
]
ROTARY_INV_FREQ = "model.layers.{i}.self_attn.rotary_emb.inv_freq"  # buffer (transformers <= 4.30)


def decoder_rules(global_map, layer_map, num_layers):
    """The rules of a decoder's key map: its global lines once, its layer lines per layer."""
    out = expand(global_map)
    for i in range(num_layers):
        out += expand(layer_map, i=i)
    return out


def rules(llm):
    """HF key -> our key rules for a LlamaConfig."""
    return decoder_rules(GLOBAL, LAYER, llm.num_layers)


def ignored_keys(llm):
    return [ROTARY_INV_FREQ.format(i=i) for i in range(llm.num_layers)]


# ----- config.json -----

def field(hf, key, where):
    if key not in hf:
        raise ConversionError(f"{where} has no {key!r}")
    return hf[key]


def refuse(where, problems):
    """Refuse a config.json describing a variant the decoder does not implement."""
    if problems:
        raise ConversionError(f"{where}: {'; '.join(problems)}: not supported by visual_mllm's decoder")


def build(config_class, where, **fields):
    """A decoder config; its own checks (heads vs widths) become errors naming config.json."""
    try:
        return config_class(**fields)
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from None


def read_config(hf, tokenizer, where):
    """(LlamaConfig, image placeholder id or None = the pad id) of a config.json dict."""
    hidden, heads = field(hf, "hidden_size", where), field(hf, "num_attention_heads", where)
    refuse(where, [text for text, bad in (
        (f"hidden_act {hf.get('hidden_act')!r} (LLaMA's is 'silu')", hf.get("hidden_act", "silu") != "silu"),
        (f"rope_scaling {hf.get('rope_scaling')}", hf.get("rope_scaling") is not None),
        ("attention_bias / mlp_bias", hf.get("attention_bias") or hf.get("mlp_bias")),
        ("tie_word_embeddings true", hf.get("tie_word_embeddings", False)),
        (f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads",
         hf.get("head_dim", hidden // heads) != hidden // heads)) if bad])
    max_positions = hf.get("max_position_embeddings", hf.get("max_sequence_length"))
    if max_positions is None:
        raise ConversionError(f"{where} has neither 'max_position_embeddings' nor 'max_sequence_length'")
    return build(LlamaConfig, where, vocab_size=field(hf, "vocab_size", where), hidden_size=hidden,
                 num_layers=field(hf, "num_hidden_layers", where), num_heads=heads,
                 num_kv_heads=hf.get("num_key_value_heads"),
                 intermediate_size=field(hf, "intermediate_size", where),
                 norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=hf.get("rope_theta", 10000.0),
                 max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.unk_token_id), None
