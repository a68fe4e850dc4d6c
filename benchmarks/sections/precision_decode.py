"""Per-token decode by weight precision on the mid-size LLaMA of `llm_decode` (same sizes, same random weights):
visual_mllm in float32, float16 storage, bfloat16 storage and weight-only int8 (float32 compute on the CPU),
each non-float32 one twice: through cpu_kernels' weight-only matmul (the weight read as stored; what inference
uses where the kernel builds) and through the portable path (the weight widened in the graph; what exported
graphs and training use), against transformers' LlamaForCausalLM in float32 and bfloat16, in the same process
on the same threads. Memory = the bytes of weights each model holds; accuracy = how far each one's decode
logits are from its framework's float32.
"""
import copy
from dataclasses import replace

import numpy as np

from ..common import Row, Section, Settings
from .llm_decode import FULL, QUICK, models, run_mindspore, run_torch

TITLE = "Decode per token by weight precision: MindSpore fp32 / fp16 / bf16 storage / int8 vs PyTorch fp32 / bf16"
CONTEXT = 128
VARIANTS = {"float16 storage": {"param_dtype": "float16"}, "bfloat16 storage": {"param_dtype": "bfloat16"},
            "int8 Linears + float16": {"param_dtype": "float16", "quantize": "int8"}}


def held_bytes(cell):
    """Bytes of every parameter as the model holds it (the KV cache excluded)."""
    return sum(int(np.prod(p.shape)) * p.itemsize for _, p in cell.parameters_and_names()
               if "cache" not in p.name)


def variant(fp32_model, **precision):
    """fp32_model's decoder rebuilt with `precision` (TowerConfig fields) and its weights: cast to the param
    dtype, or quantised to int8 with per-channel scales as a float checkpoint is at load."""
    import mindspore as ms
    from mindspore import Tensor
    from visual_mllm.layers import SCALE_SUFFIX, quantize_int8

    config = copy.deepcopy(fp32_model.config)
    for key, value in precision.items():
        setattr(config, key, value)
    model = type(fp32_model)(config)
    model.set_train(False)
    source = dict(fp32_model.parameters_and_names())
    params = dict(model.parameters_and_names())
    for name, param in params.items():
        if name.endswith(SCALE_SUFFIX) or "cache" in param.name:
            continue
        value = source[name].asnumpy()
        if param.dtype == ms.int8:
            weight, scale = quantize_int8(value)
            param.set_data(Tensor(weight))
            params[name + SCALE_SUFFIX].set_data(Tensor(scale))
        else:
            param.set_data(Tensor(value).astype(param.dtype))
    return model


def relative_error(logits, reference):
    return float(np.max(np.abs(logits - reference)) / np.max(np.abs(reference)))


def run(settings: Settings) -> Section:
    import torch
    from visual_mllm import cpu_kernels
    from visual_mllm.layers import portable_graphs

    sizes = replace(QUICK if settings.quick else FULL, contexts=(CONTEXT,))
    section = Section("precision_decode")
    section.config.append(
        f"- precision_decode model: the llm_decode LLaMA (hidden {sizes.hidden_size}, {sizes.num_layers} layers, "
        f"intermediate {sizes.intermediate_size}, vocab {sizes.vocab_size}), batch 1, decode at context "
        f"{CONTEXT} with a {sizes.cache_len}-slot KV cache; MindSpore computes in float32 on the CPU")
    llama, hf, _ = models(sizes)
    body = np.random.default_rng(0).integers(5, sizes.vocab_size - 8, size=CONTEXT).tolist()
    results = {}  # label -> (Timing, logits, bytes)
    timing, logits = run_mindspore(llama, list, sizes, settings, {CONTEXT: body}, full=False)
    results["MS float32"] = (timing[("decode", CONTEXT)], logits[("decode", CONTEXT)], held_bytes(llama))
    for label, precision in VARIANTS.items():
        model = variant(llama, **precision)
        if cpu_kernels.available():
            timing, logits = run_mindspore(model, list, sizes, settings, {CONTEXT: body}, full=False)
            results[f"MS {label}, kernel"] = (timing[("decode", CONTEXT)], logits[("decode", CONTEXT)],
                                              held_bytes(model))
        with portable_graphs(model):
            timing, logits = run_mindspore(model, list, sizes, settings, {CONTEXT: body}, full=False)
        results[f"MS {label}, widened in graph"] = (timing[("decode", CONTEXT)], logits[("decode", CONTEXT)],
                                                    held_bytes(model))
        del model
    for label, dtype in (("PT float32", torch.float32), ("PT bfloat16", torch.bfloat16)):
        model = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
        timing, logits = run_torch(model, settings, {CONTEXT: body})
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        results[label] = (timing[("decode", CONTEXT)], logits[("decode", CONTEXT)].astype(np.float32), nbytes)

    ms_base, pt_base = results["MS float32"], results["PT float32"]
    for label, (t, out, nbytes) in results.items():
        base = ms_base if label.startswith("MS") else pt_base
        section.rows.append(Row.timed(f"{label} decode, ctx {CONTEXT}", t, "ms/token",
                                      f"weights held {nbytes / 1e6:.1f} MB; logits within "
                                      f"{relative_error(out, base[1]):.1e} of {label[:2]} float32's (relative)"))
    for label, (t, _, nbytes) in results.items():
        section.rows.append(Row(f"{label} / MS float32 time", t.median_s / ms_base[0].median_s, "x", None,
                                f"weights {nbytes / ms_base[2]:.2f}x of MS float32's"))
    section.rows.append(Row("PT bfloat16 / PT float32 time", results["PT bfloat16"][0].median_s
                            / pt_base[0].median_s, "x", None, "the baseline's own cost of half precision"))
    section.notes += [
        "MindSpore on the CPU has no bfloat16 and only a slow float16 matmul: 'kernel' rows read the stored "
        "weight in visual_mllm.cpu_kernels' aot op (float32 sums); 'widened in graph' rows cast it to float32 "
        "inside the graph, one Linear at a time, before MindSpore's matmul. The memory halves (quarters for int8 "
        "Linears; the embedding and lm_head stay float16). PyTorch bfloat16 computes in bfloat16.",
        "Each MS variant holds the float32 model's weights rounded to its dtype (int8: quantised per output "
        "channel as at load); the logit error is against the float32 model of its own framework.",
    ]
    return section
