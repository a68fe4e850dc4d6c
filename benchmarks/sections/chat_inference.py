"""What a user of run_infer.py waits for: image encoding, time to first token and decode tokens/s of a
mid-size VisualGLM at batch 1 and 4, measured by visual_mllm's own inference path (the `timings` of
`inference.generate_batch`), against a PyTorch baseline of the same sizes in the same process:
transformers Blip2VisionModel + Blip2QFormerModel + a Linear projection for the image, and
LlamaForCausalLM.generate on the spliced prompt embeddings for the text.

Both sides run greedy generation of a fixed number of tokens (no end token) on random weights.
Time to first token counts from the pixels being handed to the model: image encoding, embedding
splice, prefill and choosing the first token. Decode tokens/s counts the tokens after the first over
the time between the first and the last, summed over the rows of the batch.
"""
import statistics
import time
from dataclasses import dataclass

import numpy as np

from ..common import Row, Section, Settings

TITLE = "Chat inference: image encoding, time to first token, decode tokens/s (batch 1 and 4), MindSpore vs PyTorch"

BATCHES = (1, 4)
WARMUP = 2  # untimed generations per batch size: the first compiles the graphs, the next settles them


@dataclass
class Sizes:
    image_size: int
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    vit_mlp: int
    queries: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    qformer_mlp: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    text_tokens: int       # prompt text tokens around the image placeholders
    new_tokens: int
    seq_length: int


# ViT-B/14 at 224 px (257 tokens), the real Q-Former sizes, and the llm_decode section's GLM.
FULL = Sizes(image_size=224, vit_hidden=768, vit_layers=12, vit_heads=12, vit_mlp=3072, queries=32,
             qformer_hidden=768, qformer_layers=12, qformer_heads=12, qformer_mlp=3072, vocab_size=32000,
             hidden_size=1024, num_layers=4, num_heads=16, intermediate_size=4096, text_tokens=64,
             new_tokens=32, seq_length=256)
QUICK = Sizes(image_size=56, vit_hidden=64, vit_layers=2, vit_heads=4, vit_mlp=256, queries=8,
              qformer_hidden=64, qformer_layers=2, qformer_heads=4, qformer_mlp=256, vocab_size=4096,
              hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024, text_tokens=24,
              new_tokens=8, seq_length=128)


@dataclass
class Measured:
    """Medians over the timed generations, and the fastest of them."""

    image_encode_ms: float
    first_token_ms: float
    tokens_per_s: float
    image_encode_min_ms: float
    first_token_min_ms: float
    tokens_per_s_max: float


def summarise(runs):
    """Measured from repeated runs of (image ms, first token ms, batch tokens/s)."""
    images, firsts, rates = zip(*runs)
    return Measured(statistics.median(images), statistics.median(firsts), statistics.median(rates),
                    min(images), min(firsts), max(rates))


def prompt_layout(sizes, rng, gmask, bos, low):
    """(text before the image, text after it) ids: the image placeholders sit between the two; the text is
    random ids from `low` up (past the special ids)."""
    before = rng.integers(low, sizes.vocab_size, size=4).tolist()
    after = rng.integers(low, sizes.vocab_size, size=sizes.text_tokens - 4).tolist() + [gmask, bos]
    return before, after


# ------------------------------------------------------------------------------------------- MindSpore

def build_visualglm(sizes):
    """(model, processor): the demo VisualGLM's run YAML (configs/visualglm_tiny) at the benchmark's sizes,
    with random weights, and its processor bound to it (its tiny tokenizer's special ids)."""
    import mindspore as ms
    import visual_mllm
    from visual_mllm.paths import DEFAULT_CONFIG

    ms.set_seed(0)
    model, processor = visual_mllm.load_from_yaml(
        DEFAULT_CONFIG, processor_overrides={"image_processor": {"image_size": sizes.image_size}},
        image_encoder_config={
            "vit_config": {"image_size": sizes.image_size, "patch_size": 14, "hidden_size": sizes.vit_hidden,
                           "num_layers": sizes.vit_layers, "num_heads": sizes.vit_heads,
                           "intermediate_size": sizes.vit_mlp},
            "qformer_config": {"num_query_tokens": sizes.queries, "hidden_size": sizes.qformer_hidden,
                               "num_layers": sizes.qformer_layers, "num_heads": sizes.qformer_heads,
                               "intermediate_size": sizes.qformer_mlp, "encoder_hidden_size": sizes.vit_hidden}},
        llm_config={"vocab_size": sizes.vocab_size, "hidden_size": sizes.hidden_size,
                    "num_layers": sizes.num_layers, "num_heads": sizes.num_heads,
                    "intermediate_size": sizes.intermediate_size, "max_position_embeddings": sizes.seq_length},
        seq_length=sizes.seq_length, use_past=True)
    model.set_train(False)
    return model, processor


def run_mindspore(sizes, settings, rng, pixels):
    from visual_mllm.generation.generator import PromptRow
    from visual_mllm.generation.sampling import GenerationConfig
    from visual_mllm.inference import ChatRequest, PreparedBatch, generate_batch

    model, processor = build_visualglm(sizes)
    llm = model.config.llm_config
    specials = (llm.bos_token_id, llm.eos_token_id, llm.mask_token_id, llm.gmask_token_id, llm.pad_token_id)
    before, after = prompt_layout(sizes, rng, llm.gmask_token_id, llm.bos_token_id, max(specials) + 1)
    row = PromptRow(before + [model.placeholder_id] * sizes.queries + after, len(before))
    config = GenerationConfig(max_new_tokens=sizes.new_tokens)  # greedy, no end token: every run is full length
    results = {}
    for batch in BATCHES:
        prepared = PreparedBatch([ChatRequest("(benchmark)")] * batch, [row] * batch, pixels[:batch],
                                 [[] for _ in range(batch)])

        def once():
            _, timings = generate_batch(model, processor, prepared, config)
            return (timings[0].image_encode_ms, timings[0].first_token_ms,
                    sum(t.decode_tokens_per_s for t in timings))

        for _ in range(WARMUP):
            once()
        results[batch] = summarise([once() for _ in range(settings.slow_reps)])
    return results


# --------------------------------------------------------------------------------------------- PyTorch

class TorchClock:
    """A transformers streamer noting when each generation step's tokens arrive (the first put is the prompt)."""

    def __init__(self):
        self.puts = 0
        self.times = []

    def put(self, value):
        self.puts += 1
        if self.puts > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def build_torch(sizes):
    import torch
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    vision = Blip2VisionModel(Blip2VisionConfig(
        hidden_size=sizes.vit_hidden, intermediate_size=sizes.vit_mlp, num_hidden_layers=sizes.vit_layers,
        num_attention_heads=sizes.vit_heads, image_size=sizes.image_size, patch_size=14, qkv_bias=True)).eval()
    qformer = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=sizes.qformer_hidden, num_hidden_layers=sizes.qformer_layers,
        num_attention_heads=sizes.qformer_heads, intermediate_size=sizes.qformer_mlp,
        cross_attention_frequency=2, encoder_hidden_size=sizes.vit_hidden)).eval()
    query_tokens = torch.randn(1, sizes.queries, sizes.qformer_hidden) * 0.02
    projection = torch.nn.Linear(sizes.qformer_hidden, sizes.hidden_size).eval()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.hidden_size, intermediate_size=sizes.intermediate_size,
        num_hidden_layers=sizes.num_layers, num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_heads, max_position_embeddings=sizes.seq_length,
        tie_word_embeddings=False)).eval()

    def encode(pixel_values):
        vit = vision(pixel_values=pixel_values).last_hidden_state  # post_layernorm = BLIP-2's ln_vision
        queries = qformer(query_embeds=query_tokens.expand(vit.shape[0], -1, -1),
                          encoder_hidden_states=vit).last_hidden_state
        return projection(queries)

    return encode, llama


def run_torch(sizes, settings, rng, pixels):
    import torch

    encode, llama = build_torch(sizes)
    before, after = prompt_layout(sizes, rng, 1, 2, 3)
    results = {}
    with torch.inference_mode():
        for batch in BATCHES:
            pixel_values = torch.from_numpy(pixels[:batch])
            embed = llama.get_input_embeddings()
            text_before = embed(torch.tensor([before] * batch))
            text_after = embed(torch.tensor([after] * batch))

            def once():
                clock = TorchClock()
                start = time.perf_counter()
                image = encode(pixel_values)
                encoded = time.perf_counter()
                inputs_embeds = torch.cat([text_before, image, text_after], dim=1)
                llama.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones(inputs_embeds.shape[:2]),
                               max_new_tokens=sizes.new_tokens, min_new_tokens=sizes.new_tokens, do_sample=False,
                               pad_token_id=0, streamer=clock)
                first, last = clock.times[0], clock.times[-1]
                return ((encoded - start) * 1e3, (first - start) * 1e3,
                        batch * (len(clock.times) - 1) / (last - first))

            for _ in range(WARMUP):
                once()
            results[batch] = summarise([once() for _ in range(settings.slow_reps)])
    return results


# --------------------------------------------------------------------------------------------- section

def run(settings: Settings) -> Section:
    sizes = QUICK if settings.quick else FULL
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((max(BATCHES), 3, sizes.image_size, sizes.image_size)).astype(np.float32)
    section = Section("chat_inference")
    prompt_len = sizes.text_tokens + sizes.queries
    section.config.append(
        f"- chat_inference model: ViT {sizes.image_size} px / patch 14, hidden {sizes.vit_hidden}, "
        f"{sizes.vit_layers} layers; Q-Former {sizes.queries} queries, hidden {sizes.qformer_hidden}, "
        f"{sizes.qformer_layers} layers; LLM hidden {sizes.hidden_size}, {sizes.num_layers} layers, "
        f"{sizes.num_heads} heads, inner {sizes.intermediate_size}, vocab {sizes.vocab_size}; fp32; prompt "
        f"{prompt_len} tokens ({sizes.queries} of them image), {sizes.new_tokens} new tokens, greedy; "
        f"MindSpore seq_length {sizes.seq_length} (KV cache)")
    ms_res = run_mindspore(sizes, settings, rng, pixels)
    pt_res = run_torch(sizes, settings, rng, pixels)
    reps = settings.slow_reps
    add = section.rows.append
    for batch in BATCHES:
        ms_b, pt_b = ms_res[batch], pt_res[batch]
        add(Row(f"MS image encoding, batch {batch}", ms_b.image_encode_ms, "ms", reps,
                "ViT + ln_vision + Q-Former + projection (model.encode_images)", ms_b.image_encode_min_ms))
        add(Row(f"PT image encoding, batch {batch}", pt_b.image_encode_ms, "ms", reps,
                "Blip2VisionModel + Blip2QFormerModel + Linear", pt_b.image_encode_min_ms))
        add(Row(f"MS time to first token, batch {batch}", ms_b.first_token_ms, "ms", reps,
                "image encoding + splice + prefill + first token (inference.generate_batch timings)",
                ms_b.first_token_min_ms))
        add(Row(f"PT time to first token, batch {batch}", pt_b.first_token_ms, "ms", reps,
                "image encoding + LlamaForCausalLM.generate until its first token", pt_b.first_token_min_ms))
        add(Row(f"MS decode, batch {batch}", ms_b.tokens_per_s, "tokens/s", reps,
                f"tokens 2..{sizes.new_tokens} of every row / their time (KV cache); Min column: the fastest",
                ms_b.tokens_per_s_max))
        add(Row(f"PT decode, batch {batch}", pt_b.tokens_per_s, "tokens/s", reps,
                f"tokens 2..{sizes.new_tokens} of every row / their time (DynamicCache); Min column: the fastest",
                pt_b.tokens_per_s_max))
    for batch in BATCHES:
        ms_b, pt_b = ms_res[batch], pt_res[batch]
        add(Row(f"MS / PT image encoding, batch {batch}", ms_b.image_encode_ms / pt_b.image_encode_ms, "x", None,
                "> 1: MindSpore slower"))
        add(Row(f"MS / PT time to first token, batch {batch}", ms_b.first_token_ms / pt_b.first_token_ms, "x",
                None, "> 1: MindSpore slower"))
        add(Row(f"PT / MS decode tokens/s, batch {batch}", pt_b.tokens_per_s / ms_b.tokens_per_s, "x", None,
                "> 1: MindSpore slower"))
    section.notes += [
        "MS = visual_mllm's VisualGLM (EVA ViT, Q-Former, GLM) in graph mode, timed by the `timings` run_infer.py "
        "reports; PT = transformers Blip2VisionModel + Blip2QFormerModel + Linear and LlamaForCausalLM.generate "
        "(sdpa attention, DynamicCache) under torch.inference_mode(). fp32, random weights, same threads. "
        "MS model and processor: the demo's run YAML (configs/visualglm_tiny) at these sizes; greedy choices stay "
        "below its tiny tokenizer's vocabulary.",
        "The LLMs differ as in llm_decode: LLaMA's SwiGLU MLP has 3 matrices to GLM's 2, so the baseline's "
        "decode reads ~20% more weights per token.",
        f"Median of {reps} generations after {WARMUP} untimed ones (which compile "
        "MindSpore's graphs for the batch size). Decode tokens/s is summed over the rows of the batch.",
    ]
    return section
