"""LLM prefill and per-token decode of a mid-size GLM on MindSpore (graph mode, fp32, batch 1), with and
without the KV cache, against the same steps of a transformers LLaMA of equal width/depth/vocab in
PyTorch, and against the fp32 weight-bandwidth bound.

Context N of a decode step = the number of keys the new token attends (itself included): the MindSpore
cached step writes at index N-1 (valid_length N-1) of a cache of `cache_len` slots; the no-cache step
re-runs the padded N-token sequence (valid_length N) the way the generation loop with `use_past=False` does; PyTorch
decodes one token on a DynamicCache holding N-1 tokens.
"""
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..common import Row, Section, Settings, time_call

TITLE = "LLM prefill / decode: MindSpore GLM (with and without KV cache) vs PyTorch LLaMA vs bandwidth bound"


@dataclass
class Sizes:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    inner_hidden_size: int
    cache_len: int        # slots of the KV cache the prefill/decode rows use (the engine's seq_length)
    contexts: tuple       # prefill lengths and decode contexts
    other_caches: tuple   # further cache sizes a decode at the first context is timed with
    memcpy_mb: int        # size of the array copied to measure bandwidth
    memcpy_repeats: int   # best of this many copies


FULL = Sizes(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, inner_hidden_size=4096,
             cache_len=512, contexts=(128, 512), other_caches=(128, 2048), memcpy_mb=512, memcpy_repeats=7)
# --quick: the same rows on a small model, so the smoke test stays well under a minute.
QUICK = Sizes(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, inner_hidden_size=1024,
              cache_len=512, contexts=(128, 512), other_caches=(128, 2048), memcpy_mb=64, memcpy_repeats=3)


# ------------------------------------------------------------------------------------------ bandwidth

def memcpy_bandwidth(megabytes, repeats, threads=1):
    """Best numpy copy bandwidth in bytes/s, counting bytes read + bytes written (as STREAM's Copy).

    With threads > 1 the array is copied in `threads` slices by Python threads at once (numpy
    releases the GIL while copying).
    """
    src = np.ones(megabytes * 2 ** 20 // 4, np.float32)
    dst = np.zeros_like(src)  # touched, so no page faults are timed
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    pairs = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def copy():
        if threads == 1:
            np.copyto(dst, src)
            return
        workers = [threading.Thread(target=np.copyto, args=pair) for pair in pairs]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def weight_bytes_per_decode(named_sizes, embedding_name, hidden_size, itemsize=4):
    """Bytes of weights one decode step reads: every parameter, but only one row of the input embedding
    (the parameters whose name contains `embedding_name`)."""
    total = 0
    for name, size in named_sizes:
        total += hidden_size * itemsize if embedding_name in name else size * itemsize
    return total


# ----------------------------------------------------------------------------------------- MindSpore GLM

def glm_config(sizes):
    from visual_mllm.llm.glm import GLMConfig
    v = sizes.vocab_size
    return GLMConfig(vocab_size=v, hidden_size=sizes.hidden_size, num_layers=sizes.num_layers,
                     num_heads=sizes.num_heads, inner_hidden_size=sizes.inner_hidden_size,
                     max_sequence_length=4 * max((sizes.cache_len,) + tuple(sizes.other_caches)),
                     bos_token_id=v - 4, eos_token_id=v - 3, mask_token_id=v - 2, gmask_token_id=v - 1,
                     pad_token_id=3)


def glm_prompt(config, length, rng):
    """A prompt of `length` ids ending in `[gMASK] <sop>` (the GLM layout)."""
    body = rng.integers(5, config.vocab_size - 8, size=length - 2).tolist()
    return body + [config.gmask_token_id, config.bos_token_id]


def run_mindspore(sizes, settings, rng):
    import mindspore as ms
    from mindspore import Tensor
    from visual_mllm.generation.generator import NO_IMAGE
    from visual_mllm.generation.steps import DecodeStep, EmbedStep, PrefillStep
    from visual_mllm.llm.base import KVCache
    from visual_mllm.llm.glm import GLMModel

    ms.set_seed(0)
    config = glm_config(sizes)
    llm = GLMModel(config)
    llm.set_train(False)
    weight_bytes = weight_bytes_per_decode(
        [(name, int(np.prod(p.shape))) for name, p in llm.parameters_and_names()], "word_embeddings",
        config.hidden_size)
    cache = KVCache(llm.num_layers, llm.cache_shape(1, sizes.cache_len))
    embed = EmbedStep(llm)
    prefill = PrefillStep(llm, cache)
    decode = DecodeStep(llm, cache)
    nocache = PrefillStep(llm)
    no_image = Tensor(np.zeros((1, 1, config.hidden_size), np.float32))
    no_start = Tensor(np.array([NO_IMAGE], np.int32))

    def decode_args(row, n):
        """DecodeStep inputs of the token at index n-1 after the first n-1 tokens of `row`."""
        short = row[:n - 3] + [config.gmask_token_id, config.bos_token_id]  # an (n-1)-token prompt
        return (Tensor(np.array([[row[n - 1]]], np.int32)), Tensor(llm.positions.step([short], 0)),
                Tensor(np.array([n - 1], np.int32)))

    results = {}
    for n in sizes.contexts:
        # Prefill of an n-token prompt (embedding + PrefillStep), filling the cache.
        row = glm_prompt(config, n, rng)
        ids = Tensor(np.array([row], np.int32))
        positions, prefix = llm.positions.prompt([row], n)
        pos_t, prefix_t, valid_t = Tensor(positions), Tensor(prefix), Tensor(np.array([n], np.int32))

        def run_prefill(step=prefill):
            return step(embed(ids, no_image, no_start), pos_t, valid_t, prefix_t).asnumpy()

        results[("prefill", n)] = time_call(run_prefill, settings.slow_reps, settings.warmup)

        # Decode with the cache: one token at index n-1 (the same slot rewritten by every call).
        args = decode_args(row, n)
        results[("decode", n)] = time_call(lambda: decode(*args).asnumpy(), settings.reps, settings.warmup)

        # Decode without the cache: the padded n-token sequence re-run for one new token, as
        # the generation loop with use_past=False does (embedding + PrefillStep without cache).
        results[("nocache", n)] = time_call(lambda: run_prefill(nocache), settings.slow_reps, settings.warmup)

    # The same decode step with caches of other sizes (the engine's seq_length).
    n = sizes.contexts[0]
    row = glm_prompt(config, n, rng)
    args = decode_args(row, n)
    for slots in sizes.other_caches:
        other = DecodeStep(llm, KVCache(llm.num_layers, llm.cache_shape(1, slots)))
        results[("decode_slots", slots)] = time_call(lambda: other(*args).asnumpy(), settings.reps,
                                                     settings.warmup)
    return results, weight_bytes


# ------------------------------------------------------------------------------------- PyTorch LLaMA

def run_torch(sizes, settings, rng):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=sizes.vocab_size, hidden_size=sizes.hidden_size,
                         intermediate_size=sizes.inner_hidden_size, num_hidden_layers=sizes.num_layers,
                         num_attention_heads=sizes.num_heads, num_key_value_heads=sizes.num_heads,
                         max_position_embeddings=4 * sizes.cache_len, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    weight_bytes = weight_bytes_per_decode(
        [(name, p.numel()) for name, p in model.named_parameters()], "embed_tokens", config.hidden_size)
    results = {}
    with torch.inference_mode():
        for n in sizes.contexts:
            ids = torch.from_numpy(rng.integers(5, sizes.vocab_size, size=(1, n)).astype(np.int64))

            def run_prefill():
                return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

            results[("prefill", n)] = time_call(run_prefill, settings.slow_reps, settings.warmup)

            cache = model(input_ids=ids[:, :n - 1], use_cache=True, logits_to_keep=1).past_key_values
            token = ids[:, n - 1:]

            def run_decode():
                return model(input_ids=token, past_key_values=cache, use_cache=True).logits

            results[("decode", n)] = time_call(run_decode, settings.reps, settings.warmup,
                                               before_each=lambda: cache.crop(n - 1))
    return results, weight_bytes


# ------------------------------------------------------------------------------------------- section

def run(settings: Settings) -> Section:
    sizes = QUICK if settings.quick else FULL
    rng = np.random.default_rng(0)
    section = Section("llm_decode")
    section.config.append(
        f"- llm_decode model: hidden {sizes.hidden_size}, {sizes.num_layers} layers, {sizes.num_heads} heads, "
        f"inner {sizes.inner_hidden_size}, vocab {sizes.vocab_size}, fp32, batch 1; "
        f"MindSpore KV cache of {sizes.cache_len} slots; contexts {', '.join(map(str, sizes.contexts))}")

    bw_one = memcpy_bandwidth(sizes.memcpy_mb, sizes.memcpy_repeats, 1)
    bw_all = memcpy_bandwidth(sizes.memcpy_mb, sizes.memcpy_repeats, settings.threads)
    bandwidth = max(bw_one, bw_all)
    ms_res, glm_bytes = run_mindspore(sizes, settings, rng)
    pt_res, llama_bytes = run_torch(sizes, settings, rng)
    glm_bound_ms = glm_bytes / bandwidth * 1e3
    llama_bound_ms = llama_bytes / bandwidth * 1e3

    def kv_mb(slots):
        return 2 * sizes.num_layers * slots * sizes.hidden_size * 4 / 1e6

    rows = section.rows
    add = rows.append
    first = "first call {:.2f} s".format
    for n in sizes.contexts:
        t = ms_res[("prefill", n)]
        add(Row.timed(f"MS prefill, seq {n}", t, "ms",
                      f"EmbedStep + PrefillStep writing the {sizes.cache_len}-slot cache; {first(t.first_s)}"))
    for n in sizes.contexts:
        t = ms_res[("decode", n)]
        add(Row.timed(f"MS decode with KV cache, ctx {n}", t, "ms/token",
                      f"DecodeStep, valid_length {n - 1} of {sizes.cache_len} slots; {first(t.first_s)}"))
    for n in sizes.contexts:
        t = ms_res[("nocache", n)]
        add(Row.timed(f"MS decode without cache, ctx {n}", t, "ms/token",
                      f"EmbedStep + PrefillStep(no cache) over the padded {n} tokens; {first(t.first_s)}"))
    n0 = sizes.contexts[0]
    for slots in sizes.other_caches:
        t = ms_res[("decode_slots", slots)]
        add(Row.timed(f"MS decode with KV cache, ctx {n0}, {slots}-slot cache", t, "ms/token",
                      f"as 'ctx {n0}' with a cache of {slots} slots ({kv_mb(slots):.1f} MB of K+V); "
                      f"{first(t.first_s)}"))
    for n in sizes.contexts:
        t = pt_res[("prefill", n)]
        add(Row.timed(f"PT prefill, seq {n}", t, "ms", "LlamaForCausalLM, use_cache=True, logits_to_keep=1"))
    for n in sizes.contexts:
        t = pt_res[("decode", n)]
        add(Row.timed(f"PT decode with KV cache, ctx {n}", t, "ms/token",
                      f"DynamicCache of {n - 1} tokens (cropped back before each call)"))
    add(Row("memcpy bandwidth, 1 thread", bw_one / 1e9, "GB/s", sizes.memcpy_repeats,
            f"numpy copy of {sizes.memcpy_mb} MB, best of {sizes.memcpy_repeats}; bytes read + written"))
    add(Row(f"memcpy bandwidth, {settings.threads} threads", bw_all / 1e9, "GB/s", sizes.memcpy_repeats,
            f"the same copy in {settings.threads} slices at once"))
    add(Row("GLM fp32 weight-bandwidth bound", glm_bound_ms, "ms/token", None,
            f"{glm_bytes / 1e6:.1f} MB of weights per step / the higher memcpy bandwidth "
            f"(the KV cache, {kv_mb(sizes.cache_len):.1f} MB at {sizes.cache_len} slots, not counted)"))
    add(Row("LLaMA fp32 weight-bandwidth bound", llama_bound_ms, "ms/token", None,
            f"{llama_bytes / 1e6:.1f} MB of weights per step / the higher memcpy bandwidth"))
    for n in sizes.contexts:
        add(Row(f"MS decode / PT decode, ctx {n}", ms_res[("decode", n)].median_s / pt_res[("decode", n)].median_s,
                "x", None, "> 1: MindSpore slower (per token LLaMA reads more weights, see notes)"))
    for n in sizes.contexts:
        add(Row(f"MS decode / GLM bound, ctx {n}", ms_res[("decode", n)].ms / glm_bound_ms, "x", None,
                "1 = weight-bandwidth bound reached"))
    for n in sizes.contexts:
        add(Row(f"PT decode / LLaMA bound, ctx {n}", pt_res[("decode", n)].ms / llama_bound_ms, "x", None,
                "the baseline's own distance from its bound"))
    for n in sizes.contexts:
        add(Row(f"MS no-cache / cached decode, ctx {n}",
                ms_res[("nocache", n)].median_s / ms_res[("decode", n)].median_s, "x", None,
                "speed-up the KV cache gives"))

    section.notes += [
        "MS = MindSpore GLMModel (visual_mllm.llm.glm) in graph mode; PT = transformers LlamaForCausalLM "
        "(sdpa attention) under torch.inference_mode(). Both fp32, batch 1, random weights.",
        "Equal width/depth/vocab, not equal weights: LLaMA's SwiGLU MLP has 3 matrices "
        f"(gate, up, down of {sizes.hidden_size}x{sizes.inner_hidden_size}) against GLM's 2 (fc1, fc2), and "
        "separate q/k/v/o without biases, so per token LLaMA reads "
        f"{llama_bytes / 1e6:.1f} MB of weights and GLM {glm_bytes / 1e6:.1f} MB; compare the "
        "'/ bound' rows for efficiency.",
        "Context N: the decode step's new token attends N keys (itself included). The MindSpore decode "
        "graph writes only the new slot but attends over every slot of its cache, masking the unused "
        "ones, so its cost grows with the cache size (the 'N-slot cache' rows) more than with N; "
        "PyTorch's DynamicCache holds exactly N-1 tokens.",
        "Times include the host round trip of each call (inputs already on the device, logits `.asnumpy()`); "
        "'first call' is the untimed first warm-up call, graph compilation included (a graph already "
        "compiled for the same shapes is reused).",
        "The bound assumes weights stream from DRAM at the memcpy rate (read + write bytes per second); "
        "it ignores the KV cache, activations and compute.",
    ]
    return section
