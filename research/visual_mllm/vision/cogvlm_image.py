"""CogVLM's image side: EVA2-CLIP -> drop CLS -> GLU adapter -> [boi, patches, eoi] (no Q-Former).

`EVA2CLIPModel` of cogvlm-chat-hf's `visual.py`: the tower's patch tokens (CLS dropped) go through the
GLU adapter `linear_proj` (Linear Dv->H without bias, LayerNorm (torch's eps 1e-5), exact GELU, then
`dense_4h_to_h(silu(gate_proj(y)) * dense_h_to_4h(y))`, all without bias: the SwiGLU of `layers.py`, whose
fused `gate_up` holds [gate_proj; dense_h_to_4h]) and are framed by the learned `boi` / `eoi` vectors.
The result, (S/p)^2 + 2 rows, replaces the embeddings of the prompt's image positions.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from ..configuration import StrictConfig
from ..layers import LayerNorm, Linear, Precision, SwiGLU, SQRT_HALF
from .eva_vit import Eva2Clip, Eva2ClipConfig
from .image_encoder import check_projection


class CogVLMImageEncoderConfig(StrictConfig):
    """CogVLM's image side as one config (the family's `image_encoder_config`).

    vit_config: the EVA2-CLIP tower (an Eva2ClipConfig or dict); its precision is the adapter's too.
    adapter_intermediate_size: the GLU adapter's inner width; CogVLM builds it with the LLM's
        `intermediate_size` (11008 in the release), so None means "take the LLM's" (the model fills it).
    adapter_norm_eps: 1e-5, the adapter LayerNorm's (torch's default; the tower's own are 1e-6).
    projection_size: the adapter's output width = the LLM hidden size; None = filled from the LLM config
        (a mismatch is refused, as for the BLIP-2 projection).
    """

    model_type = "visual_mllm_cogvlm_image_encoder"

    def __init__(self, vit_config=None, adapter_intermediate_size=None, adapter_norm_eps=1e-5,
                 projection_size=None, **kwargs):
        self.vit_config = self.sub_config(vit_config, Eva2ClipConfig)
        self.adapter_intermediate_size = adapter_intermediate_size
        self.adapter_norm_eps = adapter_norm_eps
        self.projection_size = projection_size
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self):
        """Rows an image fills in the prompt: boi, one per patch, eoi."""
        return self.vit_config.num_patches + 2

    def towers(self):
        """{name: TowerConfig} of the image side (precision overrides reach each)."""
        return {"vit_config": self.vit_config}

    def fit_llm(self, llm_config):
        """Fill the adapter's output and inner widths from the LLM (hidden_size, intermediate_size); refuse
        an output width that contradicts it."""
        check_projection(self, llm_config.hidden_size)
        if self.adapter_intermediate_size is None:
            self.adapter_intermediate_size = llm_config.intermediate_size


class GLUAdapter(nn.Cell):
    """CogVLM's `linear_proj`: patch tokens [B, N, Dv] -> [B, N, H]."""

    def __init__(self, in_size, hidden_size, inner_size, eps, precision):
        super().__init__()
        self.linear_proj = Linear(in_size, hidden_size, has_bias=False, precision=precision)
        self.norm1 = LayerNorm(hidden_size, eps)
        self.glu = SwiGLU(hidden_size, inner_size, precision)

    def construct(self, x):
        h = self.norm1(self.linear_proj(x))  # [B, N, H]
        h = h * 0.5 * (1.0 + ops.erf(h * SQRT_HALF))  # exact GELU, written out as layers.MLP does
        return self.glu(h)  # [B, N, H]


class CogVLMImageEncoder(nn.Cell):
    """pixel_values [B, C, H, W] -> image embeddings [B, N+2, projection_size] (boi, patches, eoi)."""

    def __init__(self, config):
        super().__init__()
        if config.projection_size is None or config.adapter_intermediate_size is None:
            raise ValueError("CogVLMImageEncoderConfig.projection_size / adapter_intermediate_size are not set: "
                             "they are the LLM's hidden_size / intermediate_size")
        self.config = config
        precision = Precision.of(config.vit_config)
        self.vit = Eva2Clip(config.vit_config)
        self.adapter = GLUAdapter(config.vit_config.hidden_size, config.projection_size,
                                  config.adapter_intermediate_size, config.adapter_norm_eps, precision)
        self.boi = Parameter(initializer(Normal(1.0), (1, 1, config.projection_size), ms.float32), name="boi")
        self.eoi = Parameter(initializer(Normal(1.0), (1, 1, config.projection_size), ms.float32), name="eoi")

    def encode_with_intermediates(self, pixel_values):
        """(vit_out [B, N+1, Dv], adapter_out [B, N, H], image_embeds [B, N+2, H])."""
        vit_out = self.vit(pixel_values)  # [B, N+1, Dv]
        adapter_out = self.adapter(vit_out[:, 1:])  # [B, N, H], CLS dropped
        b, h = adapter_out.shape[0], adapter_out.shape[2]
        boi = ops.broadcast_to(self.boi.astype(adapter_out.dtype), (b, 1, h))  # [B, 1, H]
        eoi = ops.broadcast_to(self.eoi.astype(adapter_out.dtype), (b, 1, h))  # [B, 1, H]
        return vit_out, adapter_out, ops.cat((boi, adapter_out, eoi), axis=1)  # [B, N+2, H]

    def construct(self, pixel_values):
        _, _, image_embeds = self.encode_with_intermediates(pixel_values)
        return image_embeds  # [B, N+2, H]
