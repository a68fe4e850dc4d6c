"""The LLaMA decoder (`llm/llama.py`) against transformers' LlamaForCausalLM (grouped-query attention) and
Qwen2ForCausalLM (q/k/v bias: the Qwen v1 architecture), built tiny here with the same random weights.

Logits of every prompt position match within 1e-5 (scaled to the logit range) in a right-padded batch;
greedy tokens equal transformers' own generate, with and without the KV cache.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 97, 32, 2, 4, 2, 40
PROMPTS = [[5, 17, 3, 44, 90, 12, 7], [60, 2, 33, 8, 1]]  # two lengths: a right-padded batch
NEW_TOKENS = 6


def reference(kind):
    """A transformers model of `kind` ("llama" | "qwen2") with weights that make every path matter."""
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, rope_theta=10000.0,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(7)
    model = cls(config).eval()
    with torch.no_grad():  # the default init (std 0.02) gives near-constant logits: re-randomise
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif param.ndim == 2:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
            else:  # q/k/v biases
                param.copy_(0.3 * torch.randn_like(param))
    return model


def ours(model, kind):
    import mindspore as ms
    from mindspore import Tensor
    from visual_mllm.llm.llama import LlamaConfig, LlamaModel

    ms.set_context(mode=ms.GRAPH_MODE)
    hf = model.config
    config = LlamaConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
                         num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                         intermediate_size=hf.intermediate_size, norm_eps=hf.rms_norm_eps, rope_theta=hf.rope_theta,
                         qkv_bias=kind == "qwen2", pad_token_id=0)
    llm = LlamaModel(config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    values = {"embed_tokens.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
              "lm_head.weight": state["lm_head.weight"]}
    for i in range(config.num_layers):
        src = f"model.layers.{i}."
        attn = [state[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"]
        values[f"layers.{i}.self_attn.qkv.weight"] = np.concatenate(attn)
        if config.qkv_bias:
            values[f"layers.{i}.self_attn.qkv.bias"] = np.concatenate([state[f"{src}self_attn.{p}_proj.bias"]
                                                                       for p in "qkv"])
        values[f"layers.{i}.self_attn.o_proj.weight"] = state[f"{src}self_attn.o_proj.weight"]
        values[f"layers.{i}.mlp.gate_up.weight"] = np.concatenate([state[f"{src}mlp.gate_proj.weight"],
                                                                   state[f"{src}mlp.up_proj.weight"]])
        values[f"layers.{i}.mlp.down.weight"] = state[f"{src}mlp.down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            values[f"layers.{i}.{norm}.weight"] = state[f"{src}{norm}.weight"]
    params = {p.name: p for p in llm.get_parameters()}
    assert sorted(params) == sorted(values)  # every parameter is set, none is left random
    for name, value in values.items():
        assert params[name].shape == value.shape, name
        params[name].set_data(Tensor(value))
    return llm


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    model = reference(request.param)
    return model, ours(model, request.param)


def test_prompt_logits_in_a_padded_batch(pair):
    from mindspore import Tensor

    model, llm = pair
    padded = max(map(len, PROMPTS))
    ids = np.zeros((len(PROMPTS), padded), np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, :len(p)] = p
    positions, prefix = llm.positions.prompt(PROMPTS, padded)
    valid = np.array([len(p) for p in PROMPTS], np.int32)
    hidden = llm(llm.embed(Tensor(ids)), Tensor(positions), Tensor(valid), Tensor(prefix))
    got = llm.logits(hidden).asnumpy()
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0].numpy()
        scale = np.abs(want).max()
        assert scale > 1.0  # the logits are not near-constant
        np.testing.assert_allclose(got[b, :len(prompt)], want, atol=1e-5 * scale, rtol=0)
    assert got.dtype == np.float32


@pytest.mark.parametrize("use_past", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_tokens_equal_transformers_generate(pair, use_past):
    from visual_mllm.generation.generator import EagerEngine, PromptRow, generate
    from visual_mllm.generation.sampling import GenerationConfig

    model, llm = pair
    engine = EagerEngine(llm, seq_length=32, pad_token_id=0, use_past=use_past)
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1)
    got = generate(engine, [PromptRow(p) for p in PROMPTS], gen)
    for prompt, tokens in zip(PROMPTS, got):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        assert tokens == out[0, len(prompt):].tolist()
