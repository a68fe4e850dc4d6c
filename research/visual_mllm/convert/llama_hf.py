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

The way back (convert_weight.py --mindspore_config): `export_rules` inverts the map (the fused rows
split at the config's widths; the inv_freq buffers, float32, when config.json says transformers <= 4.30
wrote the folder, as that version did), and `release_config` gives back the folder's own config.json,
which the conversion kept: unchanged, except a value the model config has changed (a size that differs
is refused: the weights would not fit the file).
"""
import torch

from ..llm.llama import LlamaConfig
from ..tokenizers.llama import VicunaTokenizer
from .keymap import IDENTITY, Rule, Transform, constant, expand, invert
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


# ----- the way back -----

def concat_rows_of(rows):
    """CONCAT_ROWS whose inverse splits the rows again into blocks of `rows`."""
    return Transform(f"concat_rows{tuple(rows)}", CONCAT_ROWS.forward, lambda t: t.split(list(rows), 0))


def fused_rows(llm):
    """Rows of each block of our fused weights, by the end of their name: qkv [Q; K; V], gate_up [gate; up]."""
    head = llm.hidden_size // llm.num_heads
    kv = llm.num_kv_heads * head
    return {".self_attn.qkv.weight": (llm.num_heads * head, kv, kv),
            ".mlp.gate_up.weight": (llm.intermediate_size, llm.intermediate_size)}


def invert_decoder(forward_rules, llm):
    """Our key -> the folder's key: `forward_rules` inverted, each CONCAT_ROWS split at the config's widths."""
    rows = fused_rows(llm)
    sized = []
    for rule in forward_rules:
        if rule.transform is CONCAT_ROWS:
            (blocks,) = [widths for end, widths in rows.items() if rule.targets[0].endswith(end)]
            rule = Rule(rule.sources, rule.targets, concat_rows_of(blocks))
        sized.append(rule)
    return invert(sized)


def saves_inv_freq(hf):
    """Whether the transformers that wrote a folder (config.json's transformers_version) saved the rotary
    inv_freq buffers: up to 4.30 it did."""
    try:
        return tuple(int(part) for part in str(hf.get("transformers_version")).split(".")[:2]) <= (4, 30)
    except ValueError:
        return False


def rotary_inv_freq(llm):
    """transformers' LlamaRotaryEmbedding buffer: 1 / theta^(2j / head_dim), float32."""
    dim = llm.hidden_size // llm.num_heads
    return 1.0 / (llm.rope_theta ** (torch.arange(0, dim, 2).float() / dim))


def export_rules(llm, hf=None):
    """Our key -> HF LLaMA key rules for a LlamaConfig, plus the inv_freq buffers when the folder's
    config.json `hf` says they belong in it (saves_inv_freq)."""
    out = invert_decoder(rules(llm), llm)
    if hf is not None and saves_inv_freq(hf):
        buffer = constant("rotary_inv_freq", lambda: rotary_inv_freq(llm))
        for i in range(llm.num_layers):
            out += expand([((), ROTARY_INV_FREQ, buffer)], i=i)
    return out


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


# the decoder config's fields that fix tensor shapes: a model config and a config.json must agree on them
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "qkv_bias")
# its other fields read from config.json, with the keys they are read from (the first one present)
VALUE_KEYS = {"norm_eps": ("rms_norm_eps",), "rope_theta": ("rope_theta",),
              "max_position_embeddings": ("max_position_embeddings", "max_sequence_length")}


def written_config(hf, llm, tokenizer, where, read, value_keys):
    """(config.json dict, the keys changed): the LLM folder's config.json `hf` for the decoder config `llm`.

    `read` turns a config.json into a decoder config (read_config); the sizes must agree (else the
    ConversionError names each), other values the model config changed are written to their key."""
    ours = read(hf, tokenizer, where)[0]
    differ = [f"{name} {getattr(llm, name)} (config.json: {getattr(ours, name)})"
              for name in SIZE_FIELDS if getattr(llm, name) != getattr(ours, name)]
    if differ:
        raise ConversionError(f"the model config's LLM does not have the sizes of {where}: {', '.join(differ)}; "
                              f"give the config.json of this LLM with --llm_path")
    out, changed = dict(hf), []
    for name, keys in value_keys.items():
        if getattr(llm, name) != getattr(ours, name):
            key = next((key for key in keys if key in hf), keys[0])
            out[key] = getattr(llm, name)
            changed.append(key)
    again = read(out, tokenizer, where)[0]
    wrong = [name for name in SIZE_FIELDS + tuple(value_keys) if getattr(again, name) != getattr(llm, name)]
    if wrong:
        raise ConversionError(f"{where}: cannot write the model config's {', '.join(wrong)} into it")
    return out, changed


def release_config(hf, llm, tokenizer, where):
    """(config.json dict, changed keys) of the HF LLaMA folder for a LlamaConfig (written_config)."""
    return written_config(hf, llm, tokenizer, where, read_config, VALUE_KEYS)
