"""VisualGLM-6B, HF-format release (`THUDM/visualglm-6b`): `config.json` + `pytorch_model-*.bin` or
`*.safetensors` shards with their index json (or one unsharded file), `ice_text.model`.

Its keys are the SAT keys renamed, as THUDM's `convert_sat_checkpoint.py` wrote them: the image side's
`mixins.eva.model.` prefix becomes `image_encoder.` (the image-side map is SAT's, in
visualglm_sat.py, with that prefix), `mixins.chatglm-final.lm_head.weight` becomes `lm_head.weight`.
The one change of content: the HF code reads GLM `query_key_value` rows per head ([q_h; k_h; v_h] for
each head h), where SAT and our GLM read [Q (all heads); K; V]; the map undoes the interleave.
Each layer carries a `rotary_emb.inv_freq` buffer (fp16) that the HF code ignores on load.

The map works both ways: `export_rules` is its inverse (our names -> HF keys), plus the inv_freq
buffers, so finetuned MindSpore weights go back to the PyTorch release format.
"""

import torch

from .keymap import IDENTITY, expand, interleaved_heads_to_blocks, invert, per_layer_buffer
from .hf_folder import config_path, read_source  # noqa: F401 (read_source: this format's reader)
from .readers import ConversionError, read_json
from .visualglm_sat import (GLM_NORMS_MLP, config_from_sat, eva_args, image_side_rules, qformer_args)

FORMAT = "visualglm-hf"
IMAGE_PREFIX = "image_encoder."

GLM_GLOBAL = [
    ("transformer.word_embeddings.weight", "llm.word_embeddings.weight", IDENTITY),
    ("transformer.final_layernorm.{p}", "llm.final_layernorm.{p}", IDENTITY),
    ("lm_head.weight", "llm.lm_head.weight", IDENTITY),
]


def glm_attention(heads):
    return [
        ("transformer.layers.{i}.attention.query_key_value.{p}", "llm.layers.{i}.attention.query_key_value.{p}",
         interleaved_heads_to_blocks(heads)),
        ("transformer.layers.{i}.attention.dense.{p}", "llm.layers.{i}.attention.dense.{p}", IDENTITY),
    ]


ROTARY_INV_FREQ = "transformer.layers.{i}.attention.rotary_emb.inv_freq"  # buffer: ignored on import


def hf_rules(config):
    """HF key -> our key rules for a VisualGLMConfig."""
    glm = config.llm_config
    rules = image_side_rules(config.image_encoder_config, eva=IMAGE_PREFIX) + expand(GLM_GLOBAL)
    for i in range(glm.num_layers):
        rules += expand(glm_attention(glm.num_heads) + GLM_NORMS_MLP, i=i)
    return rules


def ignored_keys(config):
    return [ROTARY_INV_FREQ.format(i=i) for i in range(config.llm_config.num_layers)]


def rotary_inv_freq(config):
    """The HF code's buffer: 2-D rotary over head_dim/2 dims per position row, base 10000, stored in fp16."""
    glm = config.llm_config
    dim = glm.hidden_size // (glm.num_heads * 2)
    return (1.0 / (glm.rotary_base ** (torch.arange(0, dim, 2).float() / dim))).half()


def export_rules(config):
    """Our key -> HF key rules (the inverse map) plus the per-layer inv_freq buffers of the release."""
    return invert(hf_rules(config)) + per_layer_buffer(ROTARY_INV_FREQ, config.llm_config.num_layers,
                                                       lambda: rotary_inv_freq(config))


# ----- files and config -----

def read_config(path):
    """The release's config.json as a VisualGLMConfig (its eva_config / qformer_config are SAT's args)."""
    path = config_path(path)
    hf = read_json(path)
    if "eva_config" not in hf or "qformer_config" not in hf:
        raise ConversionError(f"{path} has no eva_config / qformer_config: not a VisualGLM config "
                              "(a plain ChatGLM-6B folder?)")
    return config_from_sat(dict(hf, eva_args=hf["eva_config"], qformer_args=hf["qformer_config"]), None)


def hf_config_json(config, torch_dtype):
    """config.json of the release for a VisualGLMConfig.

    The keys of the published file, plus `tie_word_embeddings: false`: without it transformers ties
    lm_head to the word embeddings on load, which is only right when they are equal.
    """
    glm = config.llm_config
    return {
        "_name_or_path": "THUDM/visualglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"},
        "bos_token_id": glm.bos_token_id, "eos_token_id": glm.eos_token_id, "mask_token_id": glm.mask_token_id,
        "gmask_token_id": glm.gmask_token_id, "pad_token_id": glm.pad_token_id,
        "hidden_size": glm.hidden_size, "inner_hidden_size": glm.intermediate_size,
        "layernorm_epsilon": glm.norm_eps, "max_sequence_length": glm.max_position_embeddings,
        "model_type": "chatglm", "num_attention_heads": glm.num_heads, "num_layers": glm.num_layers,
        "position_encoding_2d": True, "torch_dtype": str(torch_dtype).replace("torch.", ""),
        "transformers_version": "4.27.1", "use_cache": True, "vocab_size": glm.vocab_size,
        "image_length": config.image_encoder_config.qformer_config.num_query_tokens,
        "eva_config": eva_args(config), "qformer_config": qformer_args(config),
        "tie_word_embeddings": False,
    }
