"""The BLIP-2 image side in the LAVIS layout (MiniGPT-4, MiniGPT4Qwen): three files, their literal key
tables, and the image-side sizes read from their tensor shapes.

* `eva_vit_g.pth` (--eva_vit_path): a plain state dict, no prefix. The ViT keeps its fused [Q; K; V]
  `qkv` weight; LAVIS stores no K bias but `q_bias` and `v_bias`, which become our fused bias
  [q_bias; 0; v_bias]. The released file has one block more than the models build (40, of which 39
  run): how many to use is in no file (`vit_num_layers`, default: the blocks in the file - 1); the
  rest are ignored.
* `blip2_pretrained_flant5xxl.pth` (--qformer_path): `{'model': state_dict}` with `query_tokens`,
  `ln_vision` and the BERT Q-Former `Qformer.bert.*`. Our Q-Former keeps BERT's post-LN order, so the
  keys map one to one (no LayerNorm shift, unlike SAT's layout in visualglm_sat.py). Ignored: the text
  branch (word/position embeddings, the per-layer text FFN `intermediate` / `output`), the
  `position_ids` buffer, the MLM head `Qformer.cls.*` and the T5 projection `t5_proj.*`.
* the projection checkpoint (--proj_path): MiniGPT-4's `pretrained_minigpt*.pth` holds `llama_proj`,
  MiniGPT4Qwen's `model.pth` `llm_proj` (and the Q-Former's `position_ids` buffer, which its runner
  saves with the trainable weights; ignored). Both usually under 'model'; DeepSpeed's export without.

The way back (`*_export_rules`, convert_weight.py --mindspore_config) writes the three files in this
layout from our model: the fused qkv bias is split into q_bias / v_bias (its K third must be zero:
`check_no_k_bias`); the BLIP-2 file holds what the model has (no text branch, `cls`, `t5_proj`); and
eva_vit_g.pth gets one block more than the model runs, all zeros, in the place of the released file's
unused last block. A pre-LN block whose weights and biases are all zero adds nothing to its input (its
LayerNorms output 0, so do its attention and MLP), so the file runs the same whether that block is
used or not: LAVIS's `create_eva_vit_g` skips it (strict=False), and converting the file again with
the default `vit_num_layers` (the blocks in the file - 1) gives the same model back.

Attention heads are not in any shape: the defaults are the released models' head widths (EVA ViT-g
88: `create_eva_vit_g` builds 1408 // 88 = 16 heads; bert-base 64: 768 / 64 = 12), overridable for
other sizes. The LayerNorm epsilons are in no file either: the config classes' defaults are the
released models' (EVA 1e-6, ln_vision 1e-5, BERT 1e-12).
"""
import re
from dataclasses import dataclass
from typing import Optional

import torch

from .. import families
from ..vision.eva_vit import EvaViTConfig
from ..vision.image_encoder import ImageEncoderConfig
from ..vision.qformer import QFormerConfig
from .keymap import IDENTITY, Rule, Transform, expand, invert
from .readers import ConversionError, names, read_torch_pickle
from .visualglm_sat import cross_attention_frequency

EVA_HEAD_DIM = 88   # EVA ViT-g: num_heads = embed_dim // 88
BERT_HEAD_DIM = 64  # bert-base: 12 heads of 64
LAVIS_CONTAINER = "model"  # LAVIS runners save {'model': state_dict, 'optimizer': ..., ...}
EVA_RELEASE_FILE = "eva_vit_g.pth"                     # the file names the way back writes
BLIP2_RELEASE_FILE = "blip2_pretrained_flant5xxl.pth"


def split_eva_qkv_bias(bias):
    """Our fused qkv bias [q; k; v] -> (q_bias, v_bias); LAVIS has no K bias, so k must be zero."""
    q, k, v = bias.chunk(3)
    if not bias.is_meta and bool(k.count_nonzero()):
        raise ValueError("the K third of the fused qkv bias is not zero: LAVIS's EVA stores no K bias")
    return q, v


# q_bias [D], v_bias [D] -> the fused qkv bias [3D] with a zero K third
EVA_QKV_BIAS = Transform("eva_qkv_bias", lambda q, v: (torch.cat([q, torch.zeros_like(q), v]),), split_eva_qkv_bias)

# ----- the key maps: (LAVIS key(s), our key(s), transform); `{p}` = weight and bias -----

VIT_GLOBAL = [
    ("cls_token", "image_encoder.vit.cls_token", IDENTITY),
    ("pos_embed", "image_encoder.vit.pos_embed", IDENTITY),
    ("patch_embed.proj.{p}", "image_encoder.vit.patch_embed.{p}", IDENTITY),
]
VIT_LAYER = [
    ("blocks.{i}.norm1.{p}", "image_encoder.vit.blocks.{i}.norm1.{p}", IDENTITY),
    ("blocks.{i}.attn.qkv.weight", "image_encoder.vit.blocks.{i}.attn.qkv.weight", IDENTITY),
    (("blocks.{i}.attn.q_bias", "blocks.{i}.attn.v_bias"), "image_encoder.vit.blocks.{i}.attn.qkv.bias", EVA_QKV_BIAS),
    ("blocks.{i}.attn.proj.{p}", "image_encoder.vit.blocks.{i}.attn.proj.{p}", IDENTITY),
    ("blocks.{i}.norm2.{p}", "image_encoder.vit.blocks.{i}.norm2.{p}", IDENTITY),
    ("blocks.{i}.mlp.fc1.{p}", "image_encoder.vit.blocks.{i}.mlp.fc1.{p}", IDENTITY),
    ("blocks.{i}.mlp.fc2.{p}", "image_encoder.vit.blocks.{i}.mlp.fc2.{p}", IDENTITY),
]

QFORMER_GLOBAL = [
    ("query_tokens", "image_encoder.qformer.query_tokens", IDENTITY),
    ("ln_vision.{p}", "image_encoder.ln_vision.{p}", IDENTITY),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "image_encoder.qformer.layernorm.{p}", IDENTITY),
]
QFORMER_LAYER = [
    ("Qformer.bert.encoder.layer.{i}.attention.self.query.{p}", "image_encoder.qformer.layers.{i}.self_attn.query.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.attention.self.key.{p}", "image_encoder.qformer.layers.{i}.self_attn.key.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.attention.self.value.{p}", "image_encoder.qformer.layers.{i}.self_attn.value.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.attention.output.dense.{p}", "image_encoder.qformer.layers.{i}.self_attn.dense.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.attention.output.LayerNorm.{p}", "image_encoder.qformer.layers.{i}.self_attn_norm.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.intermediate_query.dense.{p}", "image_encoder.qformer.layers.{i}.mlp.fc1.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.output_query.dense.{p}", "image_encoder.qformer.layers.{i}.mlp.fc2.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.output_query.LayerNorm.{p}", "image_encoder.qformer.layers.{i}.mlp_norm.{p}", IDENTITY),
]
QFORMER_CROSS_LAYER = [  # only layers with i % cross_attention_frequency == 0
    ("Qformer.bert.encoder.layer.{i}.crossattention.self.query.{p}", "image_encoder.qformer.layers.{i}.cross_attn.query.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.crossattention.self.key.{p}", "image_encoder.qformer.layers.{i}.cross_attn.key.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.crossattention.self.value.{p}", "image_encoder.qformer.layers.{i}.cross_attn.value.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.crossattention.output.dense.{p}", "image_encoder.qformer.layers.{i}.cross_attn.dense.{p}", IDENTITY),
    ("Qformer.bert.encoder.layer.{i}.crossattention.output.LayerNorm.{p}", "image_encoder.qformer.layers.{i}.cross_attn_norm.{p}", IDENTITY),
]
# the Q-Former's text branch, not run by the chat models (they may be absent)
QFORMER_IGNORED = [
    "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.position_ids",  # a buffer
]
QFORMER_LAYER_IGNORED = [
    "Qformer.bert.encoder.layer.{i}.intermediate.dense.{p}",
    "Qformer.bert.encoder.layer.{i}.output.dense.{p}",
    "Qformer.bert.encoder.layer.{i}.output.LayerNorm.{p}",
]
# whole modules of the BLIP-2 file no chat model runs: BERT's MLM head and the T5 projection
QFORMER_IGNORED_MODULES = ("Qformer.cls.", "t5_proj.")

PROJECTION_IGNORED = ["Qformer.bert.embeddings.position_ids"]  # saved by MiniGPT4Qwen's runner with llm_proj


def projection_rules(name):
    """The projection `name` (llama_proj, llm_proj) -> ours."""
    return expand([(name + ".{p}", "image_encoder.projection.{p}", IDENTITY)])


def source_keys(templates, **fields):
    """The keys of key templates (`{p}` = weight and bias), e.g. for the ignored lists."""
    return [key for rule in expand([(template, (), IDENTITY) for template in templates], **fields)
            for key in rule.sources]


def vit_rules(vit):
    """Rules of eva_vit_g.pth for an EvaViTConfig (its first num_layers blocks)."""
    rules = expand(VIT_GLOBAL)
    for i in range(vit.num_layers):
        rules += expand(VIT_LAYER, i=i)
    return rules


def vit_ignored(vit, blocks_in_file):
    """The blocks of the file past vit.num_layers (the released file's last one)."""
    return [key for i in range(vit.num_layers, blocks_in_file) for rule in expand(VIT_LAYER, i=i)
            for key in rule.sources]


def qformer_rules(qformer):
    """Rules of the BLIP-2 file (query tokens, ln_vision, the Q-Former's query branch) for a QFormerConfig."""
    rules = expand(QFORMER_GLOBAL)
    for i in range(qformer.num_layers):
        rules += expand(QFORMER_LAYER, i=i)
        if qformer.has_cross_attention(i):
            rules += expand(QFORMER_CROSS_LAYER, i=i)
    return rules


def qformer_ignored(source, qformer):
    """The BLIP-2 file's keys no chat model reads (present or not)."""
    keys = QFORMER_IGNORED + [key for i in range(qformer.num_layers) for key in source_keys(QFORMER_LAYER_IGNORED, i=i)]
    return keys + [key for key in source if key.startswith(QFORMER_IGNORED_MODULES)]


# ----- the way back: our names -> the LAVIS files -----

def zeros_of(transform):
    """`transform`, with every output replaced by zeros of its shape and dtype."""
    return Transform(f"zeros({transform.name})",
                     lambda *tensors: tuple(torch.zeros_like(t) for t in transform(*tensors)))


def vit_export_rules(vit):
    """Our ViT -> eva_vit_g.pth: the inverse of `vit_rules`, plus block `num_layers` as a block of zeros
    (shapes and dtypes of the last block's), which adds nothing to the image features (module docstring)."""
    last = vit.num_layers - 1
    zero_block = [Rule(ours.sources, theirs.sources, zeros_of(ours.transform))
                  for ours, theirs in zip(invert(expand(VIT_LAYER, i=last)), expand(VIT_LAYER, i=vit.num_layers))]
    return invert(vit_rules(vit)) + zero_block


def qformer_export_rules(qformer):
    """Our ln_vision and Q-Former -> the BLIP-2 file's keys (what the chat models have of it)."""
    return invert(qformer_rules(qformer))


def projection_export_rules(name):
    return invert(projection_rules(name))


def check_no_k_bias(source, vit):
    """Refuse a ViT whose fused qkv bias has a non-zero K third (it has no eva_vit_g.pth layout); reads
    only those biases, so it runs before anything is written."""
    for i in range(vit.num_layers):
        key = f"image_encoder.vit.blocks.{i}.attn.qkv.bias"
        k = source[key].load().chunk(3)[1]
        if bool(k.count_nonzero()):
            raise ConversionError(
                f"{key} ({source[key].file}): its K third is not zero (max |value| {k.abs().max().item():g}), "
                f"but eva_vit_g.pth stores no K bias (only q_bias and v_bias): this ViT cannot be written in "
                f"the LAVIS layout")


# ----- which file is which -----

@dataclass(frozen=True)
class FileKind:
    """A file one flag takes, recognised by a key only it holds."""

    flag: str
    marker: str
    what: str
    family: Optional[str] = None  # a projection belongs to one family; None = both


EVA_FILE = FileKind("--eva_vit_path", "cls_token",
                    "the EVA ViT-g weights eva_vit_g.pth (a plain state dict: cls_token, pos_embed, blocks.N.*)")
BLIP2_FILE = FileKind("--qformer_path", "query_tokens",
                      "the BLIP-2 checkpoint blip2_pretrained_flant5xxl.pth (query_tokens, ln_vision, Qformer.bert.*)")
PROJECTION_FILES = {family.name: FileKind("--proj_path", f"{family.conversion.projection}.weight",
                                           f"{family.conversion.projection_file} ({family.conversion.projection}.*)",
                                           family.name)
                    for family in families.with_conversion("lavis")}
FILE_KINDS = (EVA_FILE, BLIP2_FILE, *PROJECTION_FILES.values())


def read_state_dict(path):
    """The state dict of a LAVIS-style .pth: under 'model' (LAVIS runners), or the file itself
    (eva_vit_g.pth, DeepSpeed exports). When neither reads, the error is the first one's."""
    try:
        return read_torch_pickle(path, LAVIS_CONTAINER)
    except ConversionError as wrapped:
        try:
            return read_torch_pickle(path)
        except ConversionError:
            raise wrapped from None


def check_kind(tensors, path, kind, family):
    """Refuse a file that is not `kind`, saying what it is and which flag takes it."""
    if kind.marker in tensors:
        return
    for other in FILE_KINDS:
        if other.marker in tensors:
            where = other.flag if other.family in (None, family) else f"{other.flag} with --model_type {other.family}"
            raise ConversionError(f"{kind.flag} {path} is {other.what}: give it to {where}; {kind.flag} "
                                  f"expects {kind.what}")
    raise ConversionError(f"{kind.flag} {path} is not {kind.what}: it has no {kind.marker} "
                          f"(its keys: {names(tensors)})")


# ----- sizes from the shapes -----

def shape(source, key, meaning):
    if key not in source:
        raise ConversionError(f"{source.description}: no {key} (it gives the {meaning})")
    return source[key].shape


def count_indexed(source, pattern, meaning):
    """1 + the largest index `i` in the keys matching `pattern` (a regex with one group), e.g. blocks."""
    matches = [re.match(pattern, key) for key in source]
    found = [int(match.group(1)) for match in matches if match]
    if not found:
        raise ConversionError(f"{source.description}: no {meaning} (no key matches {pattern})")
    return max(found) + 1


def heads(width, given, head_dim, flag, model):
    """Attention heads: `given`, else width / head_dim of the released model."""
    if given is None:
        if width % head_dim:
            raise ConversionError(f"the {model} is {width} wide, not a multiple of the released head width "
                                  f"{head_dim}: give its number of attention heads with {flag}")
        return width // head_dim
    if given < 1 or width % given:
        raise ConversionError(f"{flag} {given}: the {model} width {width} does not split into {given} heads")
    return given


def vit_config(eva, num_layers=None, num_heads=None):
    """(EvaViTConfig, blocks in the file) from eva_vit_g.pth's shapes; num_layers None = all blocks but the last."""
    width = shape(eva, "cls_token", "ViT width")[-1]
    _, channels, patch, _ = shape(eva, "patch_embed.proj.weight", "patch size and channels")
    patches = shape(eva, "pos_embed", "number of positions")[1] - 1
    grid = int(round(patches ** 0.5))
    if grid * grid != patches:
        raise ConversionError(f"{eva.description}: pos_embed holds {patches} patch positions, not a square grid")
    blocks = count_indexed(eva, r"blocks\.(\d+)\.", "ViT blocks")
    layers = blocks - 1 if num_layers is None else num_layers
    if not 1 <= layers <= blocks:
        raise ConversionError(f"--vit_num_layers {layers}: {eva.description} has {blocks} blocks")
    config = EvaViTConfig(image_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=width,
                          num_layers=layers, num_heads=heads(width, num_heads, EVA_HEAD_DIM, "--vit_num_heads", "ViT"),
                          intermediate_size=shape(eva, "blocks.0.mlp.fc1.weight", "ViT MLP width")[0])
    return config, blocks


def qformer_config(blip2, num_heads=None):
    """QFormerConfig from the BLIP-2 file's shapes."""
    layer = "Qformer.bert.encoder.layer.{}."
    _, queries, width = shape(blip2, "query_tokens", "number of query tokens and the Q-Former width")
    layers = count_indexed(blip2, r"Qformer\.bert\.encoder\.layer\.(\d+)\.", "Q-Former layers")
    cross = [layer.format(i) + "crossattention.self.key.weight" in blip2 for i in range(layers)]
    frequency = cross_attention_frequency(cross)
    return QFormerConfig(
        num_query_tokens=queries, hidden_size=width, num_layers=layers,
        num_heads=heads(width, num_heads, BERT_HEAD_DIM, "--qformer_num_heads", "Q-Former"),
        intermediate_size=shape(blip2, layer.format(0) + "intermediate_query.dense.weight", "Q-Former MLP width")[0],
        cross_attention_frequency=frequency,
        encoder_hidden_size=shape(blip2, layer.format(0) + "crossattention.self.key.weight", "image feature width")[1])


def image_encoder_config(eva, blip2, llm_hidden_size, vit_num_layers=None, vit_num_heads=None,
                         qformer_num_heads=None):
    """(ImageEncoderConfig, blocks in the ViT file) from the two files; the projection outputs the LLM width."""
    vit, blocks = vit_config(eva, vit_num_layers, vit_num_heads)
    qformer = qformer_config(blip2, qformer_num_heads)
    if qformer.encoder_hidden_size != vit.hidden_size:
        raise ConversionError(f"the Q-Former of {blip2.description} reads {qformer.encoder_hidden_size}-wide image "
                              f"features but the ViT of {eva.description} is {vit.hidden_size} wide: the two "
                              f"files are not parts of one model")
    return ImageEncoderConfig(vit_config=vit, qformer_config=qformer, projection_size=llm_hidden_size), blocks
