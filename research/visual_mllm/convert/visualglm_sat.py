"""VisualGLM-6B SAT checkpoint (`visualglm-6b/`) -> visual_mllm parameter names.

The key map is written out literally, one line per SAT tensor and target, so that it can be reviewed
against the SAT state dict. `{i}` is a layer index, `{p}` is `weight` or `bias`. Each entry names a
transform that turns the SAT array into ours. The ViT keeps its fused [Q; K; V] `qkv`; the Q-Former's
fused projections are split by rows: `query_key_value` is [Q; K; V], `cross_attention.key_value` [K; V].

SAT puts the Q-Former LayerNorm at the start of each layer; we keep BERT's post-LN order. Same
network, shifted names: SAT layers.0.input_layernorm is our embedding `layernorm`, SAT
layers.{i+1}.input_layernorm is our layers.{i}.mlp_norm, SAT final_layernorm the last mlp_norm.
"""
import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from mindspore import Tensor
from mindspore.nn.utils import no_init_parameters

from ..llm.glm import GLMConfig
from ..vision.eva_vit import EvaViTConfig
from ..vision.image_encoder import ImageEncoderConfig
from ..vision.qformer import QFormerConfig

WEIGHT_BIAS = ("weight", "bias")


# ----- transforms (numpy in, numpy out) -----

def identity(a):
    return a


def add_batch_axis(a):
    """[N, D] -> [1, N, D] (SAT keeps CLS / position / query tokens as embedding tables)."""
    return a[None]


def _row_block(a, index, count):
    if a.shape[0] % count:
        raise ValueError(f"cannot split {a.shape[0]} rows into {count} equal blocks")
    rows = a.shape[0] // count
    return a[index * rows:(index + 1) * rows]


def rows_first_third(a):
    return _row_block(a, 0, 3)


def rows_second_third(a):
    return _row_block(a, 1, 3)


def rows_last_third(a):
    return _row_block(a, 2, 3)


def rows_first_half(a):
    return _row_block(a, 0, 2)


def rows_second_half(a):
    return _row_block(a, 1, 2)


# ----- the key map -----

# (SAT key, our key, transform); entries with `{p}` exist for weight and bias.
VIT_GLOBAL = [
    ("mixins.eva.model.vit.transformer.word_embeddings.weight", "image_encoder.vit.cls_token", add_batch_axis),
    ("mixins.eva.model.vit.transformer.position_embeddings.weight", "image_encoder.vit.pos_embed", add_batch_axis),
    ("mixins.eva.model.vit.mixins.patch_embedding.proj.{p}", "image_encoder.vit.patch_embed.{p}", identity),
    ("mixins.eva.model.vit.mixins.cls.ln_vision.{p}", "image_encoder.ln_vision.{p}", identity),
]
VIT_LAYER = [
    ("mixins.eva.model.vit.transformer.layers.{i}.input_layernorm.{p}", "image_encoder.vit.blocks.{i}.norm1.{p}", identity),
    ("mixins.eva.model.vit.transformer.layers.{i}.attention.query_key_value.{p}", "image_encoder.vit.blocks.{i}.attn.qkv.{p}", identity),
    ("mixins.eva.model.vit.transformer.layers.{i}.attention.dense.{p}", "image_encoder.vit.blocks.{i}.attn.proj.{p}", identity),
    ("mixins.eva.model.vit.transformer.layers.{i}.post_attention_layernorm.{p}", "image_encoder.vit.blocks.{i}.norm2.{p}", identity),
    ("mixins.eva.model.vit.transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "image_encoder.vit.blocks.{i}.mlp.fc1.{p}", identity),
    ("mixins.eva.model.vit.transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "image_encoder.vit.blocks.{i}.mlp.fc2.{p}", identity),
]
QFORMER_GLOBAL = [
    ("mixins.eva.model.qformer.transformer.word_embeddings.weight", "image_encoder.qformer.query_tokens", add_batch_axis),
    ("mixins.eva.model.qformer.transformer.layers.0.input_layernorm.{p}", "image_encoder.qformer.layernorm.{p}", identity),
    ("mixins.eva.model.glm_proj.{p}", "image_encoder.projection.{p}", identity),
]
QFORMER_LAYER = [
    ("mixins.eva.model.qformer.transformer.layers.{i}.attention.query_key_value.{p}", "image_encoder.qformer.layers.{i}.self_attn.query.{p}", rows_first_third),
    ("mixins.eva.model.qformer.transformer.layers.{i}.attention.query_key_value.{p}", "image_encoder.qformer.layers.{i}.self_attn.key.{p}", rows_second_third),
    ("mixins.eva.model.qformer.transformer.layers.{i}.attention.query_key_value.{p}", "image_encoder.qformer.layers.{i}.self_attn.value.{p}", rows_last_third),
    ("mixins.eva.model.qformer.transformer.layers.{i}.attention.dense.{p}", "image_encoder.qformer.layers.{i}.self_attn.dense.{p}", identity),
    ("mixins.eva.model.qformer.transformer.layers.{i}.post_attention_layernorm.{p}", "image_encoder.qformer.layers.{i}.self_attn_norm.{p}", identity),
    ("mixins.eva.model.qformer.transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "image_encoder.qformer.layers.{i}.mlp.fc1.{p}", identity),
    ("mixins.eva.model.qformer.transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "image_encoder.qformer.layers.{i}.mlp.fc2.{p}", identity),
]
QFORMER_CROSS_LAYER = [  # only layers with i % cross_attention_frequency == 0
    ("mixins.eva.model.qformer.transformer.layers.{i}.cross_attention.query.{p}", "image_encoder.qformer.layers.{i}.cross_attn.query.{p}", identity),
    ("mixins.eva.model.qformer.transformer.layers.{i}.cross_attention.key_value.{p}", "image_encoder.qformer.layers.{i}.cross_attn.key.{p}", rows_first_half),
    ("mixins.eva.model.qformer.transformer.layers.{i}.cross_attention.key_value.{p}", "image_encoder.qformer.layers.{i}.cross_attn.value.{p}", rows_second_half),
    ("mixins.eva.model.qformer.transformer.layers.{i}.cross_attention.dense.{p}", "image_encoder.qformer.layers.{i}.cross_attn.dense.{p}", identity),
    ("mixins.eva.model.qformer.transformer.layers.{i}.post_cross_attention_layernorm.{p}", "image_encoder.qformer.layers.{i}.cross_attn_norm.{p}", identity),
]
# The LayerNorm shift: our layer i's mlp_norm is the LayerNorm SAT applies at the start of layer i+1 ...
QFORMER_MLP_NORM = ("mixins.eva.model.qformer.transformer.layers.{next}.input_layernorm.{p}", "image_encoder.qformer.layers.{i}.mlp_norm.{p}", identity)
# ... and, after the last layer, SAT's final LayerNorm.
QFORMER_LAST_MLP_NORM = ("mixins.eva.model.qformer.transformer.final_layernorm.{p}", "image_encoder.qformer.layers.{i}.mlp_norm.{p}", identity)

# GLM (ChatGLM-6B). SAT's query_key_value rows are [Q (all heads); K; V], the order our GLM reads.
GLM_GLOBAL = [
    ("transformer.word_embeddings.weight", "llm.word_embeddings.weight", identity),
    ("transformer.final_layernorm.{p}", "llm.final_layernorm.{p}", identity),
    ("mixins.chatglm-final.lm_head.weight", "llm.lm_head.weight", identity),
]
GLM_LAYER = [
    ("transformer.layers.{i}.input_layernorm.{p}", "llm.layers.{i}.input_layernorm.{p}", identity),
    ("transformer.layers.{i}.attention.query_key_value.{p}", "llm.layers.{i}.attention.query_key_value.{p}", identity),
    ("transformer.layers.{i}.attention.dense.{p}", "llm.layers.{i}.attention.dense.{p}", identity),
    ("transformer.layers.{i}.post_attention_layernorm.{p}", "llm.layers.{i}.post_attention_layernorm.{p}", identity),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "llm.layers.{i}.mlp.fc1.{p}", identity),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "llm.layers.{i}.mlp.fc2.{p}", identity),
]
# SAT keys that carry nothing to convert: the rotary buffer (recomputed in fp32) and the unused
# position embedding table some releases carry.
IGNORED = (
    "mixins.chatglm-attn.rotary_emb.inv_freq",
    "transformer.position_embeddings.weight",
)


def _expand(entries, **fields):
    for source, target, transform in entries:
        params = WEIGHT_BIAS if "{p}" in source else (None,)
        for p in params:
            yield source.format(p=p, **fields), target.format(p=p, **fields), transform


def image_side_key_map(vit_layers, qformer_layers, cross_attention_frequency):
    """Yield (SAT key, our key, transform) for every image-side tensor of a SAT VisualGLM checkpoint.

    A SAT key appears once per target it feeds (three times for a fused qkv); every target appears once.
    """
    yield from _expand(VIT_GLOBAL)
    for i in range(vit_layers):
        yield from _expand(VIT_LAYER, i=i)
    yield from _expand(QFORMER_GLOBAL)
    for i in range(qformer_layers):
        yield from _expand(QFORMER_LAYER, i=i)
        if i % cross_attention_frequency == 0:
            yield from _expand(QFORMER_CROSS_LAYER, i=i)
        last = i == qformer_layers - 1
        yield from _expand([QFORMER_LAST_MLP_NORM if last else QFORMER_MLP_NORM], i=i, next=i + 1)


def apply_key_map(state_dict, key_map):
    """{our key: array} from a SAT state dict (a mapping of numpy arrays) and (source, target, transform) triples."""
    out = {}
    for source, target, transform in key_map:
        if target in out:
            raise ValueError(f"key map fills {target} twice")
        out[target] = transform(state_dict[source])
    return out


# ----- reading SAT files -----

class _NumpyStateDict(Mapping):
    """A torch state dict seen as numpy arrays, converted one tensor at a time when read.

    Converting lazily keeps the memory-mapped file as the only full copy: the fp16 release is
    15.6 GB, its float32 upcast 31 GB, more than the machine's RAM.
    """

    def __init__(self, tensors, float32):
        self.tensors = tensors
        self.float32 = float32

    def __getitem__(self, key):
        tensor = self.tensors[key]
        if self.float32 or tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        return tensor.numpy()

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)


def load_sat_state_dict(path, float32=False):
    """The `module` state dict of a SAT checkpoint as {key: numpy array}.

    path: the SAT folder (with `latest` naming the iteration folder) or the
    `mp_rank_00_model_states.pt` file itself. Pickles are opened with weights_only=True (no code
    runs) and memory-mapped. float32=True upcasts each tensor as it is read.
    """
    if os.path.isdir(path):
        with open(os.path.join(path, "latest"), encoding="utf-8") as f:
            iteration = f.read().strip()
        path = os.path.join(path, iteration, "mp_rank_00_model_states.pt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return _NumpyStateDict(checkpoint["module"], float32)


def _cross_attention_frequency(is_decoder):
    """SAT lists per Q-Former layer whether it has cross-attention; we need the period."""
    for frequency in range(1, len(is_decoder) + 1):
        if list(is_decoder) == [i % frequency == 0 for i in range(len(is_decoder))]:
            return frequency
    raise ValueError(f"Q-Former cross-attention layers {is_decoder} are not every n-th layer from 0")


def image_encoder_config_from_sat(model_config):
    """ImageEncoderConfig from the dict in a SAT `model_config.json` (eva_args, qformer_args, ...)."""
    eva, qformer = model_config["eva_args"], model_config["qformer_args"]
    if (eva.get("layernorm_order", "pre"), eva.get("use_final_layernorm", False), eva.get("pre_len", 1),
            eva.get("post_len", 0)) != ("pre", False, 1, 0):
        raise ValueError("eva_args: expected pre-LN blocks, no final LayerNorm, one CLS token and no suffix tokens")
    height, width = eva["image_size"]
    if height != width:
        raise ValueError(f"expected a square image_size, got {eva['image_size']}")
    if qformer["vocab_size"] != model_config["image_length"]:
        raise ValueError(f"qformer_args.vocab_size {qformer['vocab_size']} (query tokens) != "
                         f"image_length {model_config['image_length']}")
    vit_config = EvaViTConfig(
        image_size=height,
        patch_size=eva["patch_size"],
        in_channels=eva["in_channels"],
        hidden_size=eva["hidden_size"],
        num_layers=eva["num_layers"],
        num_heads=eva["num_attention_heads"],
        mlp_hidden_size=eva.get("inner_hidden_size") or 4 * eva["hidden_size"],  # SAT's default
        layer_norm_eps=eva["layernorm_epsilon"],
    )
    qformer_config = QFormerConfig(
        num_query_tokens=qformer["vocab_size"],
        hidden_size=qformer["hidden_size"],
        num_layers=qformer["num_layers"],
        num_heads=qformer["num_attention_heads"],
        intermediate_size=qformer.get("inner_hidden_size") or 4 * qformer["hidden_size"],  # SAT's default
        cross_attention_frequency=_cross_attention_frequency(qformer["is_decoder"]),
        encoder_hidden_size=qformer["cross_attn_hidden_size"],
        layer_norm_eps=qformer["layernorm_epsilon"],
    )
    return ImageEncoderConfig(vit_config=vit_config, qformer_config=qformer_config,
                              projection_size=model_config["hidden_size"])


def glm_key_map(num_layers):
    """Yield (SAT key, our key, transform) for every GLM tensor."""
    yield from _expand(GLM_GLOBAL)
    for i in range(num_layers):
        yield from _expand(GLM_LAYER, i=i)


def visualglm_key_map(config):
    """The whole VisualGLM map for a VisualGLMConfig."""
    image = config.image_encoder_config
    yield from image_side_key_map(image.vit_config.num_layers, image.qformer_config.num_layers,
                                  image.qformer_config.cross_attention_frequency)
    yield from glm_key_map(config.llm_config.num_layers)


def glm_config_from_sat(model_config, tokenizer_ids=None):
    """GLMConfig from a SAT `model_config.json` dict; special ids from it (or from tokenizer_ids)."""
    ids = dict(tokenizer_ids or {})
    hidden = model_config["hidden_size"]
    return GLMConfig(
        vocab_size=model_config["vocab_size"],
        hidden_size=hidden,
        num_layers=model_config["num_layers"],
        num_heads=model_config["num_attention_heads"],
        inner_hidden_size=model_config.get("inner_hidden_size") or 4 * hidden,  # SAT's default
        layernorm_epsilon=model_config.get("layernorm_epsilon", 1e-5),
        max_sequence_length=model_config["max_sequence_length"],
        bos_token_id=ids.get("bos_token_id", model_config["bos_token_id"]),
        eos_token_id=ids.get("eos_token_id", model_config.get("eos_token_id")),
        pad_token_id=ids.get("pad_token_id", model_config["pad_token_id"]),
        mask_token_id=ids.get("mask_token_id", model_config["mask_token_id"]),
        gmask_token_id=ids.get("gmask_token_id", model_config["gmask_token_id"]),
    )


def read_sat_model_config(path):
    """The `model_config.json` beside a SAT folder or checkpoint file."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
    config_path = os.path.join(folder, "model_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"SAT model_config.json not found beside {path} (looked for {config_path})")
    with open(config_path, encoding="utf-8") as f:
        return json.load(f)


def load_sat_model(path, tokenizer_ids=None, **config_overrides):
    """A VisualGLMForConditionalGeneration holding the weights of a SAT checkpoint (fp32).

    Strict: every SAT key is converted or listed in IGNORED, every parameter is filled with its shape.
    SAT configs carry no <eop> id: pass tokenizer_ids={"eos_token_id": ...} (from the tokenizer).
    """
    from ..models.visualglm import VisualGLMConfig, VisualGLMForConditionalGeneration

    model_config = read_sat_model_config(path)
    config = VisualGLMConfig(image_encoder_config=image_encoder_config_from_sat(model_config),
                             llm_config=glm_config_from_sat(model_config, tokenizer_ids), **config_overrides)
    state = load_sat_state_dict(path, float32=True)
    key_map = list(visualglm_key_map(config))
    unused = set(state) - {source for source, _, _ in key_map} - set(IGNORED)
    absent = sorted({source for source, _, _ in key_map} - set(state))
    if unused or absent:
        raise ValueError(f"SAT checkpoint {path} does not match its model_config.json: "
                         f"unexpected keys {sorted(unused)}, missing keys {absent}")
    with no_init_parameters():
        model = VisualGLMForConditionalGeneration(config)
    params = {p.name: p for p in model.get_parameters()}
    arrays = apply_key_map(state, key_map)
    if set(arrays) != set(params):
        raise ValueError(f"key map and model disagree: {sorted(set(arrays) ^ set(params))}")
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(params[name].shape):
            raise ValueError(f"{name}: SAT shape {tuple(array.shape)} != model {tuple(params[name].shape)}")
        params[name].set_data(Tensor(array.astype(np.float32)))
    return model
