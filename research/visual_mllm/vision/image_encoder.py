"""The BLIP-2 image side of VisualGLM, MiniGPT-4 and MiniGPT4Qwen: EVA ViT -> ln_vision -> Q-Former -> projection.

The projection is VisualGLM's `glm_proj`, MiniGPT-4's `llama_proj` and MiniGPT4Qwen's `llm_proj`
under one name; only its output width (the LLM hidden size) differs between families.
A family with another image side (CogVLM: `cogvlm_image.py`) names its own encoder and config classes;
what shared code reads of an image encoder config is `vit_config`, `projection_size`, `num_image_tokens`
and `towers()`, and of the encoder `construct` and `encode_with_intermediates`.
"""
from mindspore import nn

from ..configuration import StrictConfig
from ..layers import LayerNorm, Linear, Precision
from .eva_vit import EvaViT, EvaViTConfig
from .qformer import QFormer, QFormerConfig


class ProjectionMismatchError(ValueError):
    """The image projection's output width does not equal the LLM hidden size."""


def check_projection(image_encoder_config, llm_hidden_size):
    """Fill an unset projection width from the LLM, refuse one that does not fit it."""
    width = image_encoder_config.projection_size
    if width is None:
        image_encoder_config.projection_size = llm_hidden_size
    elif width != llm_hidden_size:
        raise ProjectionMismatchError(
            f"the image projection outputs {width} features but the LLM hidden size is {llm_hidden_size}: "
            f"the projection belongs to a different LLM size (e.g. a 13B projection with a 7B LLM)")


class ImageEncoderConfig(StrictConfig):
    """The image side as one config.

    vit_config / qformer_config: the two towers (instances or dicts, e.g. from YAML/JSON).
    ln_vision_eps: 1e-5. BLIP-2 builds ln_vision with torch's default eps, unlike the ViT's own
        1e-6 LayerNorms; HF's Blip2 post_layernorm reuses 1e-6, which is why this is separate.
    projection_size: output width = the LLM hidden size (4096 for ChatGLM-6B / Vicuna-7B / Qwen-7B,
        5120 for 13B/14B). None means "not set": a model must fill it from its LLM config, so that a
        projection of the wrong width cannot be built silently.
    """

    model_type = "visual_mllm_image_encoder"

    def __init__(self, vit_config=None, qformer_config=None, ln_vision_eps=1e-5, projection_size=None,
                 **kwargs):
        self.vit_config = self.sub_config(vit_config, EvaViTConfig)
        self.qformer_config = self.sub_config(qformer_config, QFormerConfig)
        self.ln_vision_eps = ln_vision_eps
        self.projection_size = projection_size
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self):
        """Rows an image fills in the prompt: the Q-Former's queries."""
        return self.qformer_config.num_query_tokens

    def towers(self):
        """{name: TowerConfig} of the image side (precision overrides reach each)."""
        return {"vit_config": self.vit_config, "qformer_config": self.qformer_config}

    def fit_llm(self, llm_config):
        """Fill what the LLM decides (the projection width), refuse what contradicts it."""
        check_projection(self, llm_config.hidden_size)


class ImageEncoder(nn.Cell):
    """pixel_values [B, C, H, W] -> image embeddings [B, Q, projection_size] for the LLM."""

    def __init__(self, config):
        super().__init__()
        if config.projection_size is None:
            raise ValueError("ImageEncoderConfig.projection_size is not set: it must be the LLM hidden size")
        if config.qformer_config.encoder_hidden_size != config.vit_config.hidden_size:
            raise ValueError(
                f"Q-Former encoder_hidden_size {config.qformer_config.encoder_hidden_size} must equal "
                f"the ViT hidden_size {config.vit_config.hidden_size}")
        self.config = config
        self.vit = EvaViT(config.vit_config)
        self.ln_vision = LayerNorm(config.vit_config.hidden_size, config.ln_vision_eps)
        self.qformer = QFormer(config.qformer_config)
        self.projection = Linear(config.qformer_config.hidden_size, config.projection_size,
                                 precision=Precision.of(config.qformer_config))

    def encode_with_intermediates(self, pixel_values):
        """(vit_out after ln_vision [B, N+1, Dv], qformer_out [B, Q, Dq], image_embeds [B, Q, P])."""
        vit_out = self.ln_vision(self.vit(pixel_values))  # [B, N+1, Dv]
        qformer_out = self.qformer(vit_out)  # [B, Q, Dq]
        image_embeds = self.projection(qformer_out)  # [B, Q, P]
        return vit_out, qformer_out, image_embeds

    def construct(self, pixel_values):
        _, _, image_embeds = self.encode_with_intermediates(pixel_values)
        return image_embeds  # [B, Q, P]
