"""BLIP-2 Q-Former, query branch only (what the stage-2 chat models run).

A BERT encoder (post-LN) whose input is a set of learned query tokens instead of text: the queries
attend to each other, on every `cross_attention_frequency`-th layer also to the image features, and
come out as a fixed number of image tokens. The text branch (word/position embeddings, text FFN) is
absent from the stage-2 checkpoints and not built.
"""
import mindspore as ms
from mindspore import Parameter, nn
from mindspore.common.initializer import Normal, initializer

from ..configuration import TowerConfig
from ..layers import MLP, LayerNorm, Linear, Precision, attention, merge_heads, split_heads


class QFormerConfig(TowerConfig):
    """Sizes of the Q-Former; the defaults are BLIP-2's (bert-base with 32 queries).

    num_query_tokens: number of learned queries = number of image tokens handed to the LLM (32);
        the chat prompts reserve exactly this many placeholder positions.
    hidden_size / num_layers / num_heads / intermediate_size: bert-base sizes (768 / 12 / 12 / 3072).
    cross_attention_frequency: layer i attends to the image when i % frequency == 0; BLIP-2 uses 2,
        i.e. layers 0, 2, 4, ... carry cross-attention weights and the others do not.
    encoder_hidden_size: width of the image features the cross-attention keys/values read, i.e. the
        ViT width (1408), which differs from the Q-Former width.
    norm_eps: BERT's 1e-12 (every Q-Former LayerNorm, including the one on the query tokens).
    param_dtype / compute_dtype: see TowerConfig; the projection to the LLM follows them too.
    """

    model_type = "visual_mllm_qformer"
    former_keys = {"layer_norm_eps": "norm_eps"}

    def __init__(self, num_query_tokens=32, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
                 norm_eps=1e-12, **kwargs):
        self.num_query_tokens = num_query_tokens
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.cross_attention_frequency = cross_attention_frequency
        self.encoder_hidden_size = encoder_hidden_size
        self.norm_eps = norm_eps
        super().__init__(**kwargs)

    def has_cross_attention(self, layer_index):
        return layer_index % self.cross_attention_frequency == 0


class QFormerAttention(nn.Cell):
    """BERT attention with separate query/key/value projections and the output projection `dense`.

    Self-attention: kv_size == hidden_size and context is the query stream itself.
    Cross-attention: kv_size is the image width and context is the image features.
    No mask: queries see each other and every image token (CLS included).
    """

    def __init__(self, hidden_size, num_heads, kv_size, precision):
        super().__init__()
        self.num_heads = num_heads
        self.query = Linear(hidden_size, hidden_size, precision=precision)
        self.key = Linear(kv_size, hidden_size, precision=precision)
        self.value = Linear(kv_size, hidden_size, precision=precision)
        self.dense = Linear(hidden_size, hidden_size, precision=precision)

    def construct(self, x, context):
        q = split_heads(self.query(x), self.num_heads)  # [B, h, Q, d]
        k = split_heads(self.key(context), self.num_heads)  # [B, h, S, d]
        v = split_heads(self.value(context), self.num_heads)  # [B, h, S, d]
        return self.dense(merge_heads(attention(q, k, v)))  # [B, Q, D]


class QFormerLayer(nn.Cell):
    """h = LN(x + SelfAttn(x)); on cross layers h = LN(h + CrossAttn(h, image)); out = LN(h + FFN(h))."""

    def __init__(self, config, has_cross_attention, precision):
        super().__init__()
        d, eps = config.hidden_size, config.norm_eps
        self.has_cross_attention = has_cross_attention
        self.self_attn = QFormerAttention(d, config.num_heads, d, precision)
        self.self_attn_norm = LayerNorm(d, eps)
        if has_cross_attention:
            self.cross_attn = QFormerAttention(d, config.num_heads, config.encoder_hidden_size, precision)
            self.cross_attn_norm = LayerNorm(d, eps)
        self.mlp = MLP(d, config.intermediate_size, approximate="none", precision=precision)
        self.mlp_norm = LayerNorm(d, eps)

    def construct(self, x, image_feats):
        h = self.self_attn_norm(x + self.self_attn(x, x))  # [B, Q, D]
        if self.has_cross_attention:
            h = self.cross_attn_norm(h + self.cross_attn(h, image_feats))  # [B, Q, D]
        return self.mlp_norm(h + self.mlp(h))  # [B, Q, D]


class QFormer(nn.Cell):
    """image_feats [B, N+1, Dv] (after ln_vision) -> query outputs [B, Q, D]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        precision = Precision.of(config)
        self.compute = precision.compute
        self.query_tokens = Parameter(
            initializer(Normal(0.02), (1, config.num_query_tokens, config.hidden_size), ms.float32),
            name="query_tokens")
        self.layernorm = LayerNorm(config.hidden_size, config.norm_eps)
        self.layers = nn.CellList([QFormerLayer(config, config.has_cross_attention(i), precision)
                                   for i in range(config.num_layers)])

    def construct(self, image_feats):
        b = image_feats.shape[0]
        queries = self.query_tokens.astype(self.compute)  # [1, Q, D]
        x = self.layernorm(queries.broadcast_to((b, -1, -1)))  # [B, Q, D]
        for layer in self.layers:
            x = layer(x, image_feats)  # [B, Q, D]
        return x
