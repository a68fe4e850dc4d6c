"""VisualGLM-6B, SAT release (`visualglm-6b/`: `latest`, `model_config.json`, `1/mp_rank_00_model_states.pt`).

The key map is written out literally, one line per SAT key and its target(s), so that it can be
reviewed against the SAT state dict. `{i}` is a layer index, `{p}` is `weight` or `bias` (the line
stands for both), `{eva}` is the image side's prefix (`mixins.eva.model.` here; the HF-format release
renames it, see visualglm_hf.py). The ViT keeps its fused [Q; K; V] `qkv`; the Q-Former's fused
projections are split by rows: `query_key_value` is [Q; K; V], `cross_attention.key_value` [K; V].
GLM `query_key_value` rows are [Q (all heads); K; V] in SAT, the order our GLM reads.

SAT puts the Q-Former LayerNorm at the start of each layer; we keep BERT's post-LN order. Same
network, shifted names: SAT layers.0.input_layernorm is our embedding `layernorm`, SAT
layers.{i+1}.input_layernorm is our layers.{i}.mlp_norm, SAT final_layernorm the last mlp_norm.

LoRA checkpoints of VisualGLM's finetune script (SAT LoraMixin) replace a GLM layer's
`attention.query_key_value` and `attention.dense` by `.original.{weight,bias}` plus `matrix_A.j`
(r, in) and `matrix_B.j` (out/partition, r), partition 3 for query_key_value and 1 for dense; the
layer computes original(x) + scaling * [B_0 A_0 x; B_1 A_1 x; B_2 A_2 x], scaling = lora_alpha / r
(LoraMixin's default lora_alpha is 1; the script does not change it).
"""
import os
from dataclasses import dataclass

from ..lora_layout import LORA_PARAMS
from ..llm.glm import GLMConfig
from ..models.visualglm import VisualGLMConfig
from ..vision.eva_vit import EvaViTConfig
from ..vision.image_encoder import ImageEncoderConfig
from ..vision.qformer import QFormerConfig
from .keymap import ADD_BATCH_AXIS, IDENTITY, expand, lora_a_as_one, lora_b_as_one, merge_lora, split_rows
from .readers import ConversionError, Source, read_json, read_torch_pickle

FORMAT = "visualglm-sat"
EVA_PREFIX = "mixins.eva.model."
CHECKPOINT_FILE = "mp_rank_00_model_states.pt"
STATE_DICT_KEY = "module"  # the .pt holds {"module": state_dict}

# ----- the key map: (SAT key(s), our key(s), transform) -----

VIT_GLOBAL = [
    ("{eva}vit.transformer.word_embeddings.weight", "image_encoder.vit.cls_token", ADD_BATCH_AXIS),
    ("{eva}vit.transformer.position_embeddings.weight", "image_encoder.vit.pos_embed", ADD_BATCH_AXIS),
    ("{eva}vit.mixins.patch_embedding.proj.{p}", "image_encoder.vit.patch_embed.{p}", IDENTITY),
    ("{eva}vit.mixins.cls.ln_vision.{p}", "image_encoder.ln_vision.{p}", IDENTITY),
]
VIT_LAYER = [
    ("{eva}vit.transformer.layers.{i}.input_layernorm.{p}", "image_encoder.vit.blocks.{i}.norm1.{p}", IDENTITY),
    ("{eva}vit.transformer.layers.{i}.attention.query_key_value.{p}", "image_encoder.vit.blocks.{i}.attn.qkv.{p}", IDENTITY),
    ("{eva}vit.transformer.layers.{i}.attention.dense.{p}", "image_encoder.vit.blocks.{i}.attn.proj.{p}", IDENTITY),
    ("{eva}vit.transformer.layers.{i}.post_attention_layernorm.{p}", "image_encoder.vit.blocks.{i}.norm2.{p}", IDENTITY),
    ("{eva}vit.transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "image_encoder.vit.blocks.{i}.mlp.fc1.{p}", IDENTITY),
    ("{eva}vit.transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "image_encoder.vit.blocks.{i}.mlp.fc2.{p}", IDENTITY),
]
QFORMER_GLOBAL = [
    ("{eva}qformer.transformer.word_embeddings.weight", "image_encoder.qformer.query_tokens", ADD_BATCH_AXIS),
    ("{eva}qformer.transformer.layers.0.input_layernorm.{p}", "image_encoder.qformer.layernorm.{p}", IDENTITY),
    ("{eva}glm_proj.{p}", "image_encoder.projection.{p}", IDENTITY),
]
QFORMER_LAYER = [
    ("{eva}qformer.transformer.layers.{i}.attention.query_key_value.{p}",
     ("image_encoder.qformer.layers.{i}.self_attn.query.{p}", "image_encoder.qformer.layers.{i}.self_attn.key.{p}",
      "image_encoder.qformer.layers.{i}.self_attn.value.{p}"), split_rows(3)),
    ("{eva}qformer.transformer.layers.{i}.attention.dense.{p}", "image_encoder.qformer.layers.{i}.self_attn.dense.{p}", IDENTITY),
    ("{eva}qformer.transformer.layers.{i}.post_attention_layernorm.{p}", "image_encoder.qformer.layers.{i}.self_attn_norm.{p}", IDENTITY),
    ("{eva}qformer.transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "image_encoder.qformer.layers.{i}.mlp.fc1.{p}", IDENTITY),
    ("{eva}qformer.transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "image_encoder.qformer.layers.{i}.mlp.fc2.{p}", IDENTITY),
]
QFORMER_CROSS_LAYER = [  # only layers with i % cross_attention_frequency == 0
    ("{eva}qformer.transformer.layers.{i}.cross_attention.query.{p}", "image_encoder.qformer.layers.{i}.cross_attn.query.{p}", IDENTITY),
    ("{eva}qformer.transformer.layers.{i}.cross_attention.key_value.{p}",
     ("image_encoder.qformer.layers.{i}.cross_attn.key.{p}", "image_encoder.qformer.layers.{i}.cross_attn.value.{p}"),
     split_rows(2)),
    ("{eva}qformer.transformer.layers.{i}.cross_attention.dense.{p}", "image_encoder.qformer.layers.{i}.cross_attn.dense.{p}", IDENTITY),
    ("{eva}qformer.transformer.layers.{i}.post_cross_attention_layernorm.{p}", "image_encoder.qformer.layers.{i}.cross_attn_norm.{p}", IDENTITY),
]
# The LayerNorm shift: our layer i's mlp_norm is the LayerNorm SAT applies at the start of layer i+1 ...
QFORMER_MLP_NORM = [("{eva}qformer.transformer.layers.{next}.input_layernorm.{p}", "image_encoder.qformer.layers.{i}.mlp_norm.{p}", IDENTITY)]
# ... and, after the last layer, SAT's final LayerNorm.
QFORMER_LAST_MLP_NORM = [("{eva}qformer.transformer.final_layernorm.{p}", "image_encoder.qformer.layers.{i}.mlp_norm.{p}", IDENTITY)]

# GLM (ChatGLM-6B)
GLM_GLOBAL = [
    ("transformer.word_embeddings.weight", "llm.word_embeddings.weight", IDENTITY),
    ("transformer.final_layernorm.{p}", "llm.final_layernorm.{p}", IDENTITY),
    ("mixins.chatglm-final.lm_head.weight", "llm.lm_head.weight", IDENTITY),
]
GLM_ATTENTION = [
    ("transformer.layers.{i}.attention.query_key_value.{p}", "llm.layers.{i}.attention.query_key_value.{p}", IDENTITY),
    ("transformer.layers.{i}.attention.dense.{p}", "llm.layers.{i}.attention.dense.{p}", IDENTITY),
]
GLM_NORMS_MLP = [  # the same keys in the HF-format release
    ("transformer.layers.{i}.input_layernorm.{p}", "llm.layers.{i}.input_layernorm.{p}", IDENTITY),
    ("transformer.layers.{i}.post_attention_layernorm.{p}", "llm.layers.{i}.post_attention_layernorm.{p}", IDENTITY),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "llm.layers.{i}.mlp.fc1.{p}", IDENTITY),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "llm.layers.{i}.mlp.fc2.{p}", IDENTITY),
]
# A LoRA layer's attention (replaces GLM_ATTENTION for that layer).
LORA_QKV_A = ("transformer.layers.{i}.attention.query_key_value.matrix_A.0",
              "transformer.layers.{i}.attention.query_key_value.matrix_A.1",
              "transformer.layers.{i}.attention.query_key_value.matrix_A.2")
LORA_QKV_B = ("transformer.layers.{i}.attention.query_key_value.matrix_B.0",
              "transformer.layers.{i}.attention.query_key_value.matrix_B.1",
              "transformer.layers.{i}.attention.query_key_value.matrix_B.2")
LORA_DENSE_A = ("transformer.layers.{i}.attention.dense.matrix_A.0",)
LORA_DENSE_B = ("transformer.layers.{i}.attention.dense.matrix_B.0",)
LORA_QKV_ORIGINAL = "transformer.layers.{i}.attention.query_key_value.original.{p}"
LORA_DENSE_ORIGINAL = "transformer.layers.{i}.attention.dense.original.{p}"
# Kept LoRA weights are named as mindpet's LoRADense names its parameters (mindpet 1.0.4). A LoRADense
# has one rank, and finetune LoRA checkpoints one rank for all layers: every adapter is written with
# rank LORA_SLOTS * r (query_key_value's three side by side, dense's padded with zeros) and
# lora_alpha LORA_SLOTS * alpha, which keeps the scaling alpha / r and the result exact.
LORA_A_NAME, LORA_B_NAME = LORA_PARAMS
LORA_SLOTS = 3


def glm_lora_attention(lora, keep):
    """The attention lines of a LoRA layer: merged into the weights, or the LoRA weights kept beside them."""
    qkv, dense = "llm.layers.{i}.attention.query_key_value", "llm.layers.{i}.attention.dense"
    if keep:
        return [
            (LORA_QKV_ORIGINAL, qkv + ".{p}", IDENTITY),
            (LORA_QKV_A, f"{qkv}.{LORA_A_NAME}", lora_a_as_one(3, LORA_SLOTS)),
            (LORA_QKV_B, f"{qkv}.{LORA_B_NAME}", lora_b_as_one(3, LORA_SLOTS)),
            (LORA_DENSE_ORIGINAL, dense + ".{p}", IDENTITY),
            (LORA_DENSE_A, f"{dense}.{LORA_A_NAME}", lora_a_as_one(1, LORA_SLOTS)),
            (LORA_DENSE_B, f"{dense}.{LORA_B_NAME}", lora_b_as_one(1, LORA_SLOTS)),
        ]
    return [
        (("transformer.layers.{i}.attention.query_key_value.original.weight",) + LORA_QKV_A + LORA_QKV_B,
         qkv + ".weight", merge_lora(3, lora.scaling)),
        ("transformer.layers.{i}.attention.query_key_value.original.bias", qkv + ".bias", IDENTITY),
        (("transformer.layers.{i}.attention.dense.original.weight",) + LORA_DENSE_A + LORA_DENSE_B,
         dense + ".weight", merge_lora(1, lora.scaling)),
        ("transformer.layers.{i}.attention.dense.original.bias", dense + ".bias", IDENTITY),
    ]


# SAT keys that carry nothing to convert: the rotary buffer (recomputed in fp32) and the unused
# position embedding table some releases carry.
IGNORED = (
    "mixins.chatglm-attn.rotary_emb.inv_freq",
    "transformer.position_embeddings.weight",
)


def image_side_rules(image, eva=EVA_PREFIX):
    """Rules for every image-side tensor (ViT, ln_vision, Q-Former, projection) of an ImageEncoderConfig.

    eva: the prefix of the image side's keys.
    """
    qformer = image.qformer_config
    rules = expand(VIT_GLOBAL, eva=eva)
    for i in range(image.vit_config.num_layers):
        rules += expand(VIT_LAYER, eva=eva, i=i)
    rules += expand(QFORMER_GLOBAL, eva=eva)
    for i in range(qformer.num_layers):
        rules += expand(QFORMER_LAYER, eva=eva, i=i)
        if i % qformer.cross_attention_frequency == 0:
            rules += expand(QFORMER_CROSS_LAYER, eva=eva, i=i)
        last = i == qformer.num_layers - 1
        rules += expand(QFORMER_LAST_MLP_NORM if last else QFORMER_MLP_NORM, eva=eva, i=i, next=i + 1)
    return rules


def sat_rules(config, lora=None, keep_lora=False):
    """The whole SAT map for a VisualGLMConfig; `lora` (SatLora) for a LoRA checkpoint."""
    rules = image_side_rules(config.image_encoder_config) + expand(GLM_GLOBAL)
    for i in range(config.llm_config.num_layers):
        lora_layer = lora is not None and i in lora.layers
        rules += expand((glm_lora_attention(lora, keep_lora) if lora_layer else GLM_ATTENTION) + GLM_NORMS_MLP, i=i)
    return rules


@dataclass(frozen=True)
class SatLora:
    """The LoRA layers of a SAT checkpoint, their rank and scaling (lora_alpha / rank)."""

    layers: tuple
    rank: int
    alpha: float

    @property
    def scaling(self):
        return self.alpha / self.rank

    @property
    def targets(self):
        """Our Dense layers that carry LoRA."""
        return [f"llm.layers.{i}.attention.{dense}" for i in self.layers for dense in ("query_key_value", "dense")]

    @property
    def kept_rank(self):
        return LORA_SLOTS * self.rank

    @property
    def kept_alpha(self):
        return LORA_SLOTS * self.alpha

    def kept_shapes(self, config):
        """{our LoRA key: shape} when the LoRA weights are kept (mindpet LoRADense: A (rank, in), B (out, rank))."""
        hidden = config.llm_config.hidden_size
        shapes = {}
        for target in self.targets:
            out = 3 * hidden if target.endswith("query_key_value") else hidden
            shapes[f"{target}.{LORA_A_NAME}"] = (self.kept_rank, hidden)
            shapes[f"{target}.{LORA_B_NAME}"] = (out, self.kept_rank)
        return shapes


def detect_lora(source, model_config, alpha=None):
    """SatLora if the checkpoint has LoRA layers, else None. alpha: None = model_config's lora_alpha or SAT's 1."""
    layers = tuple(i for i in range(model_config["num_layers"])
                   if LORA_QKV_ORIGINAL.format(i=i, p="weight") in source)
    if not layers:
        return None
    first_a = LORA_QKV_A[0].format(i=layers[0])
    if first_a not in source:
        raise ConversionError(f"{source.description}: layer {layers[0]} has LoRA weights but no {first_a}")
    alpha = alpha if alpha is not None else float(model_config.get("lora_alpha", 1.0))
    return SatLora(layers, int(source[first_a].shape[0]), alpha)


# ----- files and config -----

def checkpoint_file(path):
    """The .pt of a SAT folder (through `latest`) or the .pt itself."""
    if not os.path.isdir(path):
        return path
    latest = os.path.join(path, "latest")
    with open(latest, encoding="utf-8") as f:
        iteration = f.read().strip()
    pt = os.path.join(path, iteration, CHECKPOINT_FILE)
    if not os.path.isfile(pt):
        raise ConversionError(f"{latest} names iteration {iteration!r}, but {pt} does not exist")
    return pt


def read_source(path):
    """The SAT state dict ({"module": ...} of the .pt) as a Source, memory-mapped."""
    pt = checkpoint_file(path)
    return Source(read_torch_pickle(pt, STATE_DICT_KEY), [pt], f"SAT checkpoint {pt}")


def model_config_path(path):
    """`model_config.json` of a SAT folder, or beside the iteration folder of a .pt."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return os.path.join(folder, "model_config.json")


def read_model_config(path):
    config_path = model_config_path(path)
    if not os.path.isfile(config_path):
        raise ConversionError(f"SAT model_config.json not found beside {path} (looked for {config_path})")
    return read_json(config_path)


def cross_attention_frequency(is_decoder):
    """SAT lists per Q-Former layer whether it has cross-attention; we need the period."""
    for frequency in range(1, len(is_decoder) + 1):
        if list(is_decoder) == [i % frequency == 0 for i in range(len(is_decoder))]:
            return frequency
    raise ConversionError(f"Q-Former cross-attention layers {is_decoder} are not every n-th layer from 0")


def image_encoder_config_from_sat(model_config):
    """ImageEncoderConfig from a SAT `model_config.json` dict (eva_args, qformer_args, image_length, hidden_size)."""
    eva, qformer = model_config["eva_args"], model_config["qformer_args"]
    if (eva.get("layernorm_order", "pre"), eva.get("use_final_layernorm", False), eva.get("pre_len", 1),
            eva.get("post_len", 0)) != ("pre", False, 1, 0):
        raise ConversionError("eva_args: expected pre-LN blocks, no final LayerNorm, one CLS token and no suffix tokens")
    height, width = eva["image_size"]
    if height != width:
        raise ConversionError(f"expected a square image_size, got {eva['image_size']}")
    if qformer["vocab_size"] != model_config["image_length"]:
        raise ConversionError(f"qformer_args.vocab_size {qformer['vocab_size']} (query tokens) != "
                              f"image_length {model_config['image_length']}")
    vit_config = EvaViTConfig(
        image_size=height,
        patch_size=eva["patch_size"],
        in_channels=eva["in_channels"],
        hidden_size=eva["hidden_size"],
        num_layers=eva["num_layers"],
        num_heads=eva["num_attention_heads"],
        intermediate_size=eva.get("inner_hidden_size") or 4 * eva["hidden_size"],  # SAT's default
        norm_eps=eva["layernorm_epsilon"],
    )
    qformer_config = QFormerConfig(
        num_query_tokens=qformer["vocab_size"],
        hidden_size=qformer["hidden_size"],
        num_layers=qformer["num_layers"],
        num_heads=qformer["num_attention_heads"],
        intermediate_size=qformer.get("inner_hidden_size") or 4 * qformer["hidden_size"],  # SAT's default
        cross_attention_frequency=cross_attention_frequency(qformer["is_decoder"]),
        encoder_hidden_size=qformer["cross_attn_hidden_size"],
        norm_eps=qformer["layernorm_epsilon"],
    )
    return ImageEncoderConfig(vit_config=vit_config, qformer_config=qformer_config,
                              projection_size=model_config["hidden_size"])


def glm_config_from_sat(model_config, eos_token_id):
    """GLMConfig from a SAT-style config dict; SAT configs carry no <eop> id: it comes from the tokenizer."""
    hidden = model_config["hidden_size"]
    return GLMConfig(
        vocab_size=model_config["vocab_size"],
        hidden_size=hidden,
        num_layers=model_config["num_layers"],
        num_heads=model_config["num_attention_heads"],
        intermediate_size=model_config.get("inner_hidden_size") or 4 * hidden,  # SAT's default
        norm_eps=model_config.get("layernorm_epsilon", 1e-5),
        max_position_embeddings=model_config["max_sequence_length"],
        bos_token_id=model_config["bos_token_id"],
        eos_token_id=model_config.get("eos_token_id", eos_token_id),
        pad_token_id=model_config["pad_token_id"],
        mask_token_id=model_config["mask_token_id"],
        gmask_token_id=model_config["gmask_token_id"],
    )


def config_from_sat(model_config, eos_token_id):
    """VisualGLMConfig of a SAT model_config.json dict; seq_length = the GLM's max_sequence_length."""
    try:
        return VisualGLMConfig(image_encoder_config=image_encoder_config_from_sat(model_config),
                               llm_config=glm_config_from_sat(model_config, eos_token_id),
                               seq_length=model_config["max_sequence_length"])
    except KeyError as err:
        raise ConversionError(f"the model config has no {err.args[0]!r}") from None


def eva_args(config):
    """SAT `eva_args` (= the HF release's `eva_config`) of a VisualGLMConfig."""
    vit = config.image_encoder_config.vit_config
    return {"num_layers": vit.num_layers, "hidden_size": vit.hidden_size, "num_attention_heads": vit.num_heads,
            "vocab_size": 1, "layernorm_order": "pre", "model_parallel_size": 1,
            "max_sequence_length": (vit.image_size // vit.patch_size) ** 2 + 1,
            "inner_hidden_size": vit.intermediate_size, "use_final_layernorm": False,
            "layernorm_epsilon": vit.norm_eps, "image_size": [vit.image_size, vit.image_size],
            "pre_len": 1, "post_len": 0, "in_channels": vit.in_channels, "num_classes": 0,
            "patch_size": vit.patch_size}


def qformer_args(config):
    """SAT `qformer_args` (= the HF release's `qformer_config`) of a VisualGLMConfig."""
    qformer = config.image_encoder_config.qformer_config
    args = {"num_layers": qformer.num_layers, "hidden_size": qformer.hidden_size,
            "num_attention_heads": qformer.num_heads, "vocab_size": qformer.num_query_tokens,
            "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": 0,
            "is_decoder": [i % qformer.cross_attention_frequency == 0 for i in range(qformer.num_layers)],
            "cross_attn_hidden_size": qformer.encoder_hidden_size, "layernorm_epsilon": qformer.norm_eps}
    # VisualGLM's own qformer_args leave the MLP width to SAT's default (4 x hidden): write it only when
    # it differs, so that a release's config round-trips as it was written.
    if qformer.intermediate_size != 4 * qformer.hidden_size:
        args["inner_hidden_size"] = qformer.intermediate_size
    return args


def sat_model_config(config):
    """The SAT `model_config.json` dict of a VisualGLMConfig (keys as SAT writes them)."""
    glm = config.llm_config
    out = {"model_class": "VisualGLMModel", "tokenizer_type": "THUDM/chatglm-6b", "num_layers": glm.num_layers,
           "hidden_size": glm.hidden_size, "num_attention_heads": glm.num_heads, "vocab_size": glm.vocab_size,
           "layernorm_order": "post", "model_parallel_size": 1, "max_sequence_length": glm.max_position_embeddings,
           "image_length": config.image_encoder_config.qformer_config.num_query_tokens,
           "eva_args": eva_args(config), "qformer_args": qformer_args(config)}
    if glm.intermediate_size != 4 * glm.hidden_size:
        out["inner_hidden_size"] = glm.intermediate_size
    if glm.norm_eps != 1e-5:
        out["layernorm_epsilon"] = glm.norm_eps
    out.update(bos_token_id=glm.bos_token_id, mask_token_id=glm.mask_token_id, gmask_token_id=glm.gmask_token_id,
               pad_token_id=glm.pad_token_id)
    return out
