"""LLM prefill and per-token decode on MindSpore (graph mode, fp32, batch 1) against PyTorch, like for like:
visual_mllm's LLaMA decoder (`llm.llama.LlamaModel`, driven by the generation cells exactly as `Generator`
drives them) and transformers' `LlamaForCausalLM` at the same config with the same weights, in the same
process on the same threads; VisualGLM's GLM decoder of the same width beside them (decode only); and the
fp32 weight-bandwidth bound of each.

Context N of a decode step = the number of keys the new token attends (itself included): the MindSpore
cached step writes at index N-1 (valid_length N-1) of a cache of `cache_len` slots; the no-cache step
re-runs the padded N-token sequence (valid_length N) the way the generation loop with `use_past=False` does;
PyTorch decodes one token on a DynamicCache holding N-1 tokens.
"""
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..common import Row, Section, Settings, time_call

TITLE = ("LLM prefill / decode: MindSpore LLaMA vs transformers LLaMA (same config and weights), "
         "MindSpore GLM, bandwidth bound")


@dataclass
class Sizes:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int  # LLaMA's SwiGLU width and GLM's MLP width
    cache_len: int        # slots of the KV cache the prefill/decode rows use (the engine's seq_length)
    contexts: tuple       # prefill lengths and decode contexts
    other_caches: tuple   # further cache sizes a decode at the first context is timed with
    memcpy_mb: int        # size of the array copied to measure bandwidth
    memcpy_repeats: int   # best of this many copies


FULL = Sizes(vocab_size=32000, hidden_size=1024, num_layers=4, num_heads=16, num_kv_heads=16,
             intermediate_size=4096, cache_len=512, contexts=(128, 512), other_caches=(128, 2048), memcpy_mb=512,
             memcpy_repeats=7)
# --quick: the same rows on a small model, so the smoke test stays well under a minute.
QUICK = Sizes(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=1024,
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


# ------------------------------------------------------------------------------------------ models

def models(sizes):
    """(our LlamaModel, transformers LlamaForCausalLM with the same weights, our GLMModel), all fp32."""
    import mindspore as ms
    import torch
    import transformers
    from visual_mllm.convert import llama_hf
    from visual_mllm.llm.glm import GLMConfig, GLMModel
    from visual_mllm.llm.llama import LlamaConfig, LlamaModel

    from ..hf_weights import copy_weights

    torch.manual_seed(0)
    ms.set_seed(0)
    longest = 4 * max((sizes.cache_len,) + tuple(sizes.other_caches))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers, num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=longest, tie_word_embeddings=False)).eval()
    llama = LlamaModel(LlamaConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.hidden_size, num_layers=sizes.num_layers,
        num_heads=sizes.num_heads, num_kv_heads=sizes.num_kv_heads, intermediate_size=sizes.intermediate_size,
        norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=longest))
    copy_weights(llama, llama_hf.rules(llama.config), hf.state_dict(), prefix="llm.")
    v = sizes.vocab_size
    glm = GLMModel(GLMConfig(vocab_size=v, hidden_size=sizes.hidden_size, num_layers=sizes.num_layers,
                             num_heads=sizes.num_heads, intermediate_size=sizes.intermediate_size,
                             max_position_embeddings=longest, bos_token_id=v - 4, eos_token_id=v - 3,
                             mask_token_id=v - 2, gmask_token_id=v - 1, pad_token_id=3))
    llama.set_train(False)
    glm.set_train(False)
    return llama, hf, glm


def glm_prompt(config, body):
    """GLM's layout of a prompt as long as `body`: its ids but the last two, then `[gMASK] <sop>`."""
    return list(body[:-2]) + [config.gmask_token_id, config.bos_token_id]


# ----------------------------------------------------------------------------------------- MindSpore

def run_mindspore(llm, layout, sizes, settings, bodies, full):
    """Times of the generation cells on `llm` ({(kind, n): Timing}) and the logits of each prefill / decode
    ({(kind, n): [V]}). `layout(body)` = the family's prompt of len(body) ids. Decode with the KV cache at
    every context; with `full` also the prefill (run first, so that the decode step reads the prompt's keys
    and values as in generation), the no-cache path and the other cache sizes."""
    from mindspore import Tensor
    from visual_mllm.generation.generator import NO_IMAGE
    from visual_mllm.generation.steps import DecodeStep, EmbedStep, PrefillStep

    cache = llm.new_cache(1, sizes.cache_len)
    embed = EmbedStep(llm)
    prefill = PrefillStep(llm, cache)
    decode = DecodeStep(llm, cache)
    nocache = PrefillStep(llm)
    no_image = Tensor(np.zeros((1, 1, llm.config.hidden_size), np.float32))
    no_start = Tensor(np.array([NO_IMAGE], np.int32))

    def prefill_call(row, step):
        ids = Tensor(np.array([row], np.int32))
        positions, prefix = llm.positions.prompt([row], len(row))
        args = Tensor(positions), Tensor(np.array([len(row)], np.int32)), Tensor(prefix)
        return lambda: step(embed(ids, no_image, no_start), *args).asnumpy()

    def decode_call(body, step):
        """The token at index n-1 after the first n-1 tokens (their prompt layout) of `body`, n = len(body)."""
        n = len(body)
        args = (Tensor(np.array([[layout(body)[n - 1]]], np.int32)),
                Tensor(llm.positions.step([layout(body[:n - 1])], 0)), Tensor(np.array([n - 1], np.int32)))
        return lambda: step(*args).asnumpy()

    results, logits = {}, {}
    for n in sizes.contexts:
        if full:  # the prefill of the n tokens also fills the cache the decode step reads
            run_prefill = prefill_call(layout(bodies[n]), prefill)
            results[("prefill", n)] = time_call(run_prefill, settings.slow_reps, settings.warmup)
            logits[("prefill", n)] = run_prefill()[0]
        # Decode with the cache: one token at index n-1 (the same slot rewritten by every call).
        run_decode = decode_call(bodies[n], decode)
        results[("decode", n)] = time_call(run_decode, settings.reps, settings.warmup)
        logits[("decode", n)] = run_decode()[0]
        if full:  # the padded n tokens re-run for one new token, as the loop with use_past=False does
            results[("nocache", n)] = time_call(prefill_call(layout(bodies[n]), nocache), settings.slow_reps,
                                                settings.warmup)
    if full:  # the same decode step with caches of other sizes (the engine's seq_length)
        for slots in sizes.other_caches:
            other = DecodeStep(llm, llm.new_cache(1, slots))
            results[("decode_slots", slots)] = time_call(decode_call(bodies[sizes.contexts[0]], other),
                                                         settings.reps, settings.warmup)
    return results, logits


# --------------------------------------------------------------------------------------------- PyTorch

def run_torch(model, settings, bodies):
    import torch

    results, logits = {}, {}
    with torch.inference_mode():
        for n, body in bodies.items():
            ids = torch.tensor([body], dtype=torch.int64)

            def run_prefill():
                return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

            results[("prefill", n)] = time_call(run_prefill, settings.slow_reps, settings.warmup)
            logits[("prefill", n)] = run_prefill()[0, -1].float().numpy()

            cache = model(input_ids=ids[:, :n - 1], use_cache=True, logits_to_keep=1).past_key_values
            token = ids[:, n - 1:]

            def run_decode():
                return model(input_ids=token, past_key_values=cache, use_cache=True).logits

            results[("decode", n)] = time_call(run_decode, settings.reps, settings.warmup,
                                               before_each=lambda: cache.crop(n - 1))
            cache.crop(n - 1)
            logits[("decode", n)] = run_decode()[0, -1].float().numpy()
    return results, logits


# ------------------------------------------------------------------------------------------- section

def parameter_sizes(cell):
    return [(name, int(np.prod(p.shape))) for name, p in cell.parameters_and_names()]


def largest_difference(ours, theirs):
    """max |ours - theirs| over every logits vector, relative to the largest |logit| of theirs."""
    return max(float(np.max(np.abs(ours[key] - theirs[key])) / np.max(np.abs(theirs[key]))) for key in theirs)


def run(settings: Settings) -> Section:
    sizes = QUICK if settings.quick else FULL
    rng = np.random.default_rng(0)
    section = Section("llm_decode")
    section.config.append(
        f"- llm_decode model: hidden {sizes.hidden_size}, {sizes.num_layers} layers, {sizes.num_heads} heads "
        f"({sizes.num_kv_heads} key/value heads), intermediate {sizes.intermediate_size}, vocab "
        f"{sizes.vocab_size}, fp32, batch 1; MindSpore KV cache of {sizes.cache_len} slots; contexts "
        f"{', '.join(map(str, sizes.contexts))}")

    bw_one = memcpy_bandwidth(sizes.memcpy_mb, sizes.memcpy_repeats, 1)
    bw_all = memcpy_bandwidth(sizes.memcpy_mb, sizes.memcpy_repeats, settings.threads)
    bandwidth = max(bw_one, bw_all)
    llama, hf, glm = models(sizes)
    llama_bytes = weight_bytes_per_decode(parameter_sizes(llama), "embed_tokens", sizes.hidden_size)
    glm_bytes = weight_bytes_per_decode(parameter_sizes(glm), "word_embeddings", sizes.hidden_size)
    bodies = {n: rng.integers(5, sizes.vocab_size - 8, size=n).tolist() for n in sizes.contexts}
    ms_res, ms_logits = run_mindspore(llama, list, sizes, settings, bodies, full=True)
    glm_res, _ = run_mindspore(glm, lambda body: glm_prompt(glm.config, body), sizes, settings, bodies,
                               full=False)
    pt_res, pt_logits = run_torch(hf, settings, bodies)
    llama_bound_ms = llama_bytes / bandwidth * 1e3
    glm_bound_ms = glm_bytes / bandwidth * 1e3

    def kv_mb(slots):
        return 2 * sizes.num_layers * slots * sizes.num_kv_heads * (sizes.hidden_size // sizes.num_heads) * 4 / 1e6

    add = section.rows.append
    first = "first call {:.2f} s".format
    for n in sizes.contexts:
        t = ms_res[("prefill", n)]
        add(Row.timed(f"MS prefill, seq {n}", t, "ms",
                      f"LlamaModel: EmbedStep + PrefillStep writing the {sizes.cache_len}-slot cache; "
                      f"{first(t.first_s)}"))
    for n in sizes.contexts:
        add(Row.timed(f"PT prefill, seq {n}", pt_res[("prefill", n)], "ms",
                      "LlamaForCausalLM, use_cache=True, logits_to_keep=1"))
    for n in sizes.contexts:
        t = ms_res[("decode", n)]
        add(Row.timed(f"MS decode with KV cache, ctx {n}", t, "ms/token",
                      f"LlamaModel: DecodeStep, valid_length {n - 1} of {sizes.cache_len} slots; {first(t.first_s)}"))
    for n in sizes.contexts:
        add(Row.timed(f"PT decode with KV cache, ctx {n}", pt_res[("decode", n)], "ms/token",
                      f"DynamicCache of {n - 1} tokens (cropped back before each call)"))
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
        t = glm_res[("decode", n)]
        add(Row.timed(f"MS GLM decode with KV cache, ctx {n}", t, "ms/token",
                      f"GLMModel of the same width (VisualGLM's decoder): DecodeStep, valid_length {n - 1} of "
                      f"{sizes.cache_len} slots; {first(t.first_s)}"))
    add(Row("memcpy bandwidth, 1 thread", bw_one / 1e9, "GB/s", sizes.memcpy_repeats,
            f"numpy copy of {sizes.memcpy_mb} MB, best of {sizes.memcpy_repeats}; bytes read + written"))
    add(Row(f"memcpy bandwidth, {settings.threads} threads", bw_all / 1e9, "GB/s", sizes.memcpy_repeats,
            f"the same copy in {settings.threads} slices at once"))
    add(Row("LLaMA fp32 weight-bandwidth bound", llama_bound_ms, "ms/token", None,
            f"{llama_bytes / 1e6:.1f} MB of weights per step / the higher memcpy bandwidth "
            f"(the KV cache, {kv_mb(sizes.cache_len):.1f} MB at {sizes.cache_len} slots, not counted)"))
    add(Row("GLM fp32 weight-bandwidth bound", glm_bound_ms, "ms/token", None,
            f"{glm_bytes / 1e6:.1f} MB of weights per step / the higher memcpy bandwidth"))
    for n in sizes.contexts:
        add(Row(f"MS / PT prefill, seq {n}", ms_res[("prefill", n)].median_s / pt_res[("prefill", n)].median_s,
                "x", None, "same config and weights; > 1: MindSpore slower"))
    for n in sizes.contexts:
        add(Row(f"MS / PT decode, ctx {n}", ms_res[("decode", n)].median_s / pt_res[("decode", n)].median_s,
                "x", None, "same config and weights; > 1: MindSpore slower"))
    for n in sizes.contexts:
        add(Row(f"MS decode / LLaMA bound, ctx {n}", ms_res[("decode", n)].ms / llama_bound_ms, "x", None,
                "1 = weight-bandwidth bound reached"))
    for n in sizes.contexts:
        add(Row(f"PT decode / LLaMA bound, ctx {n}", pt_res[("decode", n)].ms / llama_bound_ms, "x", None,
                "the baseline's own distance from the bound"))
    for n in sizes.contexts:
        add(Row(f"MS GLM decode / GLM bound, ctx {n}", glm_res[("decode", n)].ms / glm_bound_ms, "x", None,
                "1 = weight-bandwidth bound reached"))
    for n in sizes.contexts:
        add(Row(f"MS no-cache / cached decode, ctx {n}",
                ms_res[("nocache", n)].median_s / ms_res[("decode", n)].median_s, "x", None,
                "speed-up the KV cache gives"))

    section.notes += [
        "MS = visual_mllm's LlamaModel (visual_mllm.llm.llama: fused qkv and gate_up) in graph mode; PT = "
        "transformers LlamaForCausalLM (sdpa attention) under torch.inference_mode(); the same config, "
        "RMSNorm eps 1e-6, rope theta 1e4, fp32, batch 1, and the same random weights (HF's init, copied into "
        "ours by the converter's key map). Their logits of every timed prefill and decode agree to "
        f"{largest_difference(ms_logits, pt_logits):.1e} of the largest logit.",
        "MS GLM = VisualGLM's GLMModel (visual_mllm.llm.glm) at the same width, depth, heads and inner size: "
        "its MLP has 2 matrices (fc1, fc2) to LLaMA's 3 (gate, up, down) and biases, so per token it reads "
        f"{glm_bytes / 1e6:.1f} MB of weights to LLaMA's {llama_bytes / 1e6:.1f} MB.",
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
