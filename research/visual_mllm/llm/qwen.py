"""Qwen-7B-Chat v1, the LLM of MiniGPT4Qwen: the LLaMA decoder of `llama.py` with a q/k/v bias.

Qwen v1 differs from LLaMA only in what its checkpoint holds (architecture.md section 2): a fused
`c_attn` (rows [Q; K; V]) with a bias, `c_proj` without one, the MLP `c_proj(w1(x) * silu(w2(x)))` (w2
is the gated branch) and untied `lm_head`. Its dynamic-NTK rotary and log-n attention scaling act only
beyond the training length (8192), so inside it the decoder is exactly LLaMA's. The v1 config.json names
differ (`intermediate_size` = 2 x the branch width, `layer_norm_epsilon`, `rotary_emb_base`, `kv_channels`):
the converter translates them into these fields.
"""
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .llama import LlamaConfig, LlamaModel


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class QwenConfig(LlamaConfig):
    """A LlamaConfig with Qwen-7B-Chat's defaults (vocab 151936 incl. padding, q/k/v bias, 8192 context)."""

    model_type = "visual_mllm_qwen"

    def __init__(self, vocab_size=151936, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=None,
                 intermediate_size=11008, norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                 qkv_bias=True,
                 bos_token_id=None,       # Qwen adds no BOS
                 eos_token_id=151643,     # <|endoftext|>; chat turns end at <|im_end|> (the prompt's stop ids)
                 pad_token_id=151643,     # <|endoftext|>, as Qwen's generation config pads
                 **kwargs):
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, norm_eps=norm_eps,
                         rope_theta=rope_theta, max_position_embeddings=max_position_embeddings, qkv_bias=qkv_bias,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


QwenModel = LlamaModel  # the decoder itself is LLaMA's
