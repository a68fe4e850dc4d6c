"""EVA ViT-g/14, the image tower of VisualGLM-6B, MiniGPT-4 and MiniGPT4Qwen, and EVA2-CLIP-E, CogVLM's.

A plain pre-LN ViT: patch convolution, a CLS token and learned absolute position embeddings, then
`x = x + attn(norm1(x)); x = x + mlp(norm2(x))` per block, exact GELU, and no final LayerNorm (the
`ln_vision` that follows belongs to the ImageEncoder). Parameter names follow the EVA/LAVIS
`eva_vit_g.pth` layout, except that q_bias / v_bias are stored as one fused qkv bias (as SAT and HF do).

EVA2-CLIP as CogVLM runs it (`Eva2Clip`) is the same tower with one difference in the blocks: the
LayerNorms sit *after* each branch, `h = x + norm1(attn(x)); out = h + norm2(mlp(h))` (`PostNormBlock`);
CogVLM's checkpoint has a bias on all of q, k and v, which the fused qkv bias holds as it is.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from ..configuration import TowerConfig
from ..layers import MLP, LayerNorm, Linear, Precision, attention, merge_heads, split_heads


class EvaViTConfig(TowerConfig):
    """Sizes of the EVA ViT; the defaults are the released ViT-g/14 as the three chat models use it.

    image_size: side of the square input in pixels (224); with patch_size it fixes the token count,
        so it must match the position-embedding table of the checkpoint (257 = (224/14)^2 + 1).
    patch_size: side of a patch and stride of the patch convolution (14).
    in_channels: 3 (RGB); the checkpoint's patch convolution is (hidden, 3, 14, 14).
    hidden_size: token width (1408); ln_vision and the Q-Former cross-attention consume this width.
    num_layers: 39 blocks. The released eva_vit_g.pth has 40, but BLIP-2 and its descendants drop
        the last one (they read the features of the penultimate block), so 39 is what they run.
    num_heads: 16 heads of 88 dims.
    intermediate_size: the MLP width, 6144 (EVA's mlp_ratio 4.3637, not the usual 4x), so it cannot be
        derived.
    norm_eps: 1e-6 inside the blocks (EVA's own value; ln_vision uses torch's default 1e-5).
    param_dtype / compute_dtype: see TowerConfig (the patch embedding, CLS and position tables stay
        float32: they are small).
    """

    model_type = "visual_mllm_eva_vit"
    former_keys = {"mlp_hidden_size": "intermediate_size", "layer_norm_eps": "norm_eps"}

    def __init__(self, image_size=224, patch_size=14, in_channels=3, hidden_size=1408, num_layers=39,
                 num_heads=16, intermediate_size=6144, norm_eps=1e-6, **kwargs):
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.norm_eps = norm_eps
        super().__init__(**kwargs)

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2


class EvaAttention(nn.Cell):
    """Self-attention with a fused [Q; K; V] projection `qkv` (3D x D) and an output projection `proj`.

    EVA has no key bias; the fused bias simply holds zeros in its K third (checkpoints store it so).
    """

    def __init__(self, hidden_size, num_heads, precision):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(hidden_size, 3 * hidden_size, precision=precision)
        self.proj = Linear(hidden_size, hidden_size, precision=precision)

    def construct(self, x):
        q, k, v = ops.chunk(self.qkv(x), 3, axis=-1)  # 3 x [B, S, D]
        out = attention(split_heads(q, self.num_heads), split_heads(k, self.num_heads),
                        split_heads(v, self.num_heads))  # [B, h, S, d]
        return self.proj(merge_heads(out))  # [B, S, D]


class PatchEmbed(nn.Cell):
    """The patch "convolution" (kernel = stride = patch_size, no padding) as one matmul over flattened
    patches: the same sums as the checkpoint's Conv2d (`weight` [D, C, p, p], `bias` [D]), but MindSpore's
    CPU Conv2d with a 14x14 kernel is ~100x slower than the matmul (benchmarks/README.md, image encoding).
    pixel_values [B, C, H, W] come in the weight's dtype -> [B, N, D].
    """

    def __init__(self, in_channels, hidden_size, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.fan_in = in_channels * patch_size * patch_size
        self.weight = Parameter(initializer(Normal(0.02), (hidden_size, in_channels, patch_size, patch_size),
                                            ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (hidden_size,), ms.float32), name="bias")

    def construct(self, pixel_values):
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        gh, gw = h // p, w // p  # a remainder is dropped, as the valid convolution does
        x = pixel_values[:, :, :gh * p, :gw * p]  # [B, C, gh*p, gw*p]
        x = x.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
        x = x.reshape(b, gh * gw, self.fan_in)  # [B, N, C*p*p], patches row-major
        weight = self.weight.reshape(self.weight.shape[0], self.fan_in)  # [D, C*p*p]
        return ops.matmul(x, weight.swapaxes(0, 1)) + self.bias.astype(x.dtype)  # [B, N, D]


class EvaBlock(nn.Cell):
    """Pre-LN transformer block without layer scale."""

    def __init__(self, config, precision):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, config.norm_eps)
        self.attn = EvaAttention(config.hidden_size, config.num_heads, precision)
        self.norm2 = LayerNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, approximate="none", precision=precision)

    def construct(self, x):
        x = x + self.attn(self.norm1(x))  # [B, S, D]
        return x + self.mlp(self.norm2(x))  # [B, S, D]


class PostNormBlock(EvaBlock):
    """EVA2-CLIP's block (CogVLM's `visual.py` TransformerLayer): each branch normed before it is added."""

    def construct(self, x):
        x = x + self.norm1(self.attn(x))  # [B, S, D]
        return x + self.norm2(self.mlp(x))  # [B, S, D]


class EvaViT(nn.Cell):
    """pixel_values [B, C, H, W] -> tokens [B, N+1, D] (CLS first, then the patches row-major)."""

    block_class = EvaBlock

    def __init__(self, config):
        super().__init__()
        self.config = config
        precision = Precision.of(config)
        self.compute = precision.compute
        d = config.hidden_size
        self.cls_token = Parameter(initializer(Normal(0.02), (1, 1, d), ms.float32), name="cls_token")
        self.pos_embed = Parameter(initializer(Normal(0.02), (1, config.num_patches + 1, d), ms.float32),
                                   name="pos_embed")
        self.patch_embed = PatchEmbed(config.in_channels, d, config.patch_size)
        self.blocks = nn.CellList([self.block_class(config, precision) for _ in range(config.num_layers)])

    def construct(self, pixel_values):
        # cast here, not inside PatchEmbed: under amp the cell's own entry casts its inputs and weights
        x = self.patch_embed(pixel_values.astype(self.patch_embed.weight.dtype))  # [B, N, D], patches row-major
        b, d = x.shape[0], x.shape[2]
        cls = ops.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, d))  # [B, 1, D]
        x = (ops.cat((cls, x), axis=1) + self.pos_embed.astype(x.dtype)).astype(self.compute)  # [B, N+1, D]
        for block in self.blocks:
            x = block(x)  # [B, N+1, D]
        return x


class Eva2ClipConfig(EvaViTConfig):
    """EvaViTConfig with the defaults of CogVLM-17B's EVA2-CLIP-E (`vision_config` of cogvlm-chat-hf's
    config.json): 490 px, patch 14 (35 x 35 = 1225 patches + CLS = its 1226 `num_positions`), 1792 wide,
    63 layers, 16 heads, MLP 15360, LayerNorm eps 1e-6, exact GELU."""

    model_type = "visual_mllm_eva2_clip"

    def __init__(self, image_size=490, patch_size=14, in_channels=3, hidden_size=1792, num_layers=63,
                 num_heads=16, intermediate_size=15360, norm_eps=1e-6, **kwargs):
        super().__init__(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                         hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         intermediate_size=intermediate_size, norm_eps=norm_eps, **kwargs)


class Eva2Clip(EvaViT):
    """CogVLM's EVA2-CLIP tower: EvaViT with post-branch-norm blocks, no final norm; [B, N+1, D] out."""

    block_class = PostNormBlock
