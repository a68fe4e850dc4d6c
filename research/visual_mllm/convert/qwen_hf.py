"""Qwen-7B-Chat v1 as its HF folder (remote-code `QWenLMHeadModel`), the LLM of MiniGPT4Qwen (--llm_path).

Files: `config.json` (model_type "qwen"), `model-*.safetensors` (or `pytorch_model-*.bin`) shards with
their index json, `qwen.tiktoken` + `tokenizer_config.json`. The remote-code `.py` files are not needed.

The key map is written out literally, one line per Qwen key. `c_attn` rows are [Q; K; V] in contiguous
thirds (weight and bias): our fused `qkv` as it is. The MLP is `c_proj(w1(x) * silu(w2(x)))`: `w2` is
the gated branch, so our `mlp.gate_up` = rows [w2; w1] (the other order runs and is wrong by O(10)).

config.json (v1 names) -> QwenConfig: `intermediate_size` is 2 x the branch width, `layer_norm_epsilon`,
`rotary_emb_base`, `kv_channels` (the head width; must be hidden / heads), `seq_length` (the trained
length: dynamic NTK and log-n scaling act only beyond it, so within it the decoder is exact). The
eos/pad id is the tokenizer's `<|endoftext|>` and the image placeholder its `<|extra_0|>` (the v1
config.json carries no special ids).

The way back: `export_rules` (c_attn as it is, gate_up split into [w2; w1]) and `release_config` (the
folder's own config.json, see llama_hf.written_config).
"""
from ..llm.qwen import QwenConfig
from ..processing.qwen_prompt import IMAGE_PLACEHOLDER
from ..tokenizers.qwen import QWenTokenizer
from .keymap import IDENTITY
from .llama_hf import CONCAT_ROWS, build, decoder_rules, field, invert_decoder, refuse, written_config

FORMAT = "hf-qwen"
MODEL_TYPE = "qwen"  # config.json's model_type
WHAT = "an HF Qwen-7B-Chat (v1) folder (config.json, weights, qwen.tiktoken)"
TOKENIZER = QWenTokenizer

# ----- the key map: (Qwen key(s), our key, transform); `{p}` = weight and bias -----

GLOBAL = [
    ("transformer.wte.weight", "llm.embed_tokens.weight", IDENTITY),
    ("transformer.ln_f.weight", "llm.norm.weight", IDENTITY),
    ("lm_head.weight", "llm.lm_head.weight", IDENTITY),
]
LAYER = [
    ("transformer.h.{i}.ln_1.weight", "llm.layers.{i}.input_layernorm.weight", IDENTITY),
    ("transformer.h.{i}.attn.c_attn.{p}", "llm.layers.{i}.self_attn.qkv.{p}", IDENTITY),
    ("transformer.h.{i}.attn.c_proj.weight", "llm.layers.{i}.self_attn.o_proj.weight", IDENTITY),
    ("transformer.h.{i}.ln_2.weight", "llm.layers.{i}.post_attention_layernorm.weight", IDENTITY),
    (("transformer.h.{i}.mlp.w2.weight", "transformer.h.{i}.mlp.w1.weight"), "llm.layers.{i}.mlp.gate_up.weight",
     CONCAT_ROWS),
    ("transformer.h.{i}.mlp.c_proj.weight", "llm.layers.{i}.mlp.down.weight", IDENTITY),
]


def rules(llm):
    """Qwen key -> our key rules for a QwenConfig."""
    return decoder_rules(GLOBAL, LAYER, llm.num_layers)


def ignored_keys(llm):
    return []  # the v1 checkpoints hold no buffers


def export_rules(llm, hf=None):
    """Our key -> Qwen key rules for a QwenConfig (the v1 folders hold no buffers, whatever config.json `hf` says)."""
    return invert_decoder(rules(llm), llm)


def read_config(hf, tokenizer, where):
    """(QwenConfig, the <|extra_0|> id that fills the image slots) of a v1 config.json dict."""
    hidden, heads = field(hf, "hidden_size", where), field(hf, "num_attention_heads", where)
    kv_channels, intermediate = field(hf, "kv_channels", where), field(hf, "intermediate_size", where)
    refuse(where, [text for text, bad in (
        (f"kv_channels {kv_channels} x num_attention_heads {heads} != hidden_size {hidden}",
         kv_channels * heads != hidden),
        (f"intermediate_size {intermediate} is not 2 x a branch width", intermediate % 2),
        (f"rotary_pct {hf.get('rotary_pct')}", hf.get("rotary_pct", 1.0) != 1.0),
        ("no_bias false", not hf.get("no_bias", True)),
        ("tie_word_embeddings true", hf.get("tie_word_embeddings", False))) if bad])
    eod = tokenizer.eod_id
    trained_length = hf["seq_length"] if "seq_length" in hf else field(hf, "max_position_embeddings", where)
    return build(QwenConfig, where, vocab_size=field(hf, "vocab_size", where), hidden_size=hidden,
                 num_layers=field(hf, "num_hidden_layers", where), num_heads=heads,
                 intermediate_size=intermediate // 2, norm_eps=hf.get("layer_norm_epsilon", 1e-6),
                 rope_theta=hf.get("rotary_emb_base", 10000.0),
                 max_position_embeddings=trained_length,
                 eos_token_id=eod, pad_token_id=eod), tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


# QwenConfig fields read from config.json other than sizes, and their v1 keys (the first one present)
VALUE_KEYS = {"norm_eps": ("layer_norm_epsilon",), "rope_theta": ("rotary_emb_base",),
              "max_position_embeddings": ("seq_length", "max_position_embeddings")}


def release_config(hf, llm, tokenizer, where):
    """(config.json dict, changed keys) of the Qwen v1 folder for a QwenConfig (llama_hf.written_config)."""
    return written_config(hf, llm, tokenizer, where, read_config, VALUE_KEYS)
