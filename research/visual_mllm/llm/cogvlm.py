"""CogVLM's decoder: LLaMA layers with a vision expert and a language expert (cogvlm-chat-hf's
`modeling_cogvlm.py`), with the LLM interface of `llm/base.py`.

Every layer holds two copies of its fused qkv projection, its attention output projection (`dense`) and
its SwiGLU MLP: the *vision expert* and the *language expert*. A token takes the vision expert iff it and
the next token are image rows (`get_expert_mask`): boi and the patches do, eoi and all text do not, and
the last token of any forward chunk never does (a cached decode token always takes the language expert).
Attention itself runs over all tokens together. The numerics are LLaMA's (`llama.py`): pre-RMSNorm,
rotate-half RoPE over the whole head dim with base 10000, causal attention scaled by 1/sqrt(head_dim), no
biases, final RMSNorm, untied lm_head. Expert routing is by selection (`ops.where`): a prefill computes
both experts for every token (static shapes, one graph; twice the matmul work of one expert) and keeps
the routed one; a decode step runs only the language expert.

Positions (`build_position_ids`): +1 per token, except that the image patches strictly inside boi/eoi
share one position: BOS 0, boi 1, every patch 2, eoi 3, text 4, 5, ...; generated tokens continue +1.
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from ..layers import Linear, SwiGLU
from .base import PositionScheme
from .llama import LlamaAttention, LlamaBlock, LlamaConfig, LlamaModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class CogVLMDecoderConfig(LlamaConfig):
    """A LlamaConfig with cogvlm-chat-hf's defaults (Vicuna-7B v1.5 sizes; `rms_norm_eps` 1e-5 as the release's
    config.json says, where the remote code's class default is 1e-6). Both experts have these sizes."""

    model_type = "visual_mllm_cogvlm_llm"

    def __init__(self, vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=None,
                 intermediate_size=11008, norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
                 qkv_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs):
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, norm_eps=norm_eps,
                         rope_theta=rope_theta, max_position_embeddings=max_position_embeddings, qkv_bias=qkv_bias,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


def row_positions(types):
    """CogVLM's position ids of one row from its token types (0/1 sequence) -> int32 [len(types)]."""
    vision = np.asarray(types, np.int64) == 1  # [S]
    before = np.concatenate(([False], vision[:-1]))
    after = np.concatenate((vision[1:], [False]))
    inner = vision & before & after  # patches strictly between boi and eoi
    step = np.ones(len(vision), np.int64)
    step[0] = 0
    step[1:] -= inner[1:] & inner[:-1]  # a patch after a patch keeps the position
    return np.cumsum(step).astype(np.int32)


class CogVLMPositions(PositionScheme):
    """`row_positions` over each prompt (token types required for image rows: None means text only)."""

    rows = 1

    def _row(self, row, b, token_types):
        types = np.zeros(len(row), np.int64) if token_types is None else np.asarray(token_types[b])[:len(row)]
        return row_positions(types)

    def prompt(self, rows, padded_length, token_types=None):
        pos = np.zeros((len(rows), 1, padded_length), np.int32)
        for b, row in enumerate(rows):
            pos[b, 0, :len(row)] = self._row(row, b, token_types)
        return pos, np.zeros((len(rows),), np.int32)

    def step(self, rows, generated, token_types=None):
        return np.array([self._row(row, b, token_types)[-1] + 1 + generated for b, row in enumerate(rows)],
                        np.int32).reshape(-1, 1, 1)


class Experts(nn.Cell):
    """A vision and a language copy of one sublayer; route [B,S,1] bool picks per token (None: language)."""

    def __init__(self, vision, language):
        super().__init__()
        self.vision = vision
        self.language = language

    def construct(self, x, route):
        out = self.language(x)  # [B,S,out]
        if route is None:
            return out
        return ops.where(route, self.vision(x), out)  # [B,S,out]


class CogVLMAttention(LlamaAttention):
    """LLaMA attention whose qkv and output projections are `Experts`."""

    def make_linear(self, in_features, out_features, has_bias, precision):
        return Experts(Linear(in_features, out_features, has_bias=has_bias, precision=precision),
                       Linear(in_features, out_features, has_bias=has_bias, precision=precision))

    def project_qkv(self, x, route):
        return self.qkv(x, route)  # [B,S,3H]

    def project_out(self, x, route):
        return self.o_proj(x, route)  # [B,S,H]


class CogVLMBlock(LlamaBlock):
    """LLaMA block with expert attention and an expert SwiGLU MLP."""

    attention_class = CogVLMAttention

    def build_mlp(self, config, precision):
        return Experts(SwiGLU(config.hidden_size, config.intermediate_size, precision),
                       SwiGLU(config.hidden_size, config.intermediate_size, precision))

    def feed_forward(self, x, route):
        return self.mlp(x, route)  # [B,S,H]


class CogVLMDecoder(LlamaModel):
    """The LLaMA decoder with CogVLM's experts and positions; takes token types."""

    block_class = CogVLMBlock
    takes_token_types = True

    @classmethod
    def position_scheme(cls, config):
        return CogVLMPositions()

    def route(self, token_types, decode):
        """token_types [B,S] -> vision-expert choice [B,S,1] bool (None in a decode step: language)."""
        if decode or token_types is None:
            return None
        image = token_types == 1  # [B,S]
        vision = ops.logical_and(image[:, :-1], image[:, 1:])  # [B,S-1]: this and the next are image rows
        last = ops.zeros((image.shape[0], 1), ms.bool_)  # the chunk's last token: language
        return ops.concat((vision, last), axis=1).expand_dims(-1)  # [B,S,1]
