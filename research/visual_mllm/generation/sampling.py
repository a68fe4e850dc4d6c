"""Choosing the next token from logits, on the host (numpy): greedy or sampled.

The logits of one step are [B, V] floats, small next to the model, and numpy has the same argmax and
sort on every backend (mindformers' default argmax/top-k kernels do not exist on CPU).
Order of the processors as in HF transformers and the reference demos:
repetition penalty -> temperature -> top-k -> top-p.
"""
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                   # 0 = no top-k filter
    top_p: float = 1.0               # 1.0 = no nucleus filter
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the row
    eos_token_id: Optional[int] = None
    seed: Optional[int] = None
    # a row also stops when its generated ids end with one of these (kept in its ids; the prompt
    # builder cuts the answer text before it), e.g. MiniGPT-4's "###" as [835] or [2277, 29937]
    stop_sequences: Sequence[Sequence[int]] = ()
    # ids >= this are never chosen: the LLM's vocabulary padding past the tokenizer (Qwen: 151936 rows,
    # 151851 ids), which a trained model never emits and no tokenizer can decode; None = every row
    vocab_limit: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("top_k must be >= 0 and repetition_penalty > 0")

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty")


def demo_generation_config(demo, max_new_tokens, eos_token_id, do_sample=None, seed=None, **given):
    """The GenerationConfig of the `given` settings (SAMPLING_FIELDS; None = not given), defaulting to a family's
    reference demo settings `demo` (its Family.sampling): do_sample None = the demo's. Greedy is plain greedy:
    the demo's sampling settings apply only when sampling."""
    do_sample = demo.get("do_sample", False) if do_sample is None else do_sample
    values = {name: value for name, value in given.items() if value is not None}
    if do_sample:
        values = {**{k: v for k, v in demo.items() if k in SAMPLING_FIELDS}, **values}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_token_id,
                            seed=seed, **values)


def apply_repetition_penalty(logits, seen, penalty):
    """logits [B,V]; seen: per row, the ids already in the sequence (prompt and answer)."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for b, ids in enumerate(seen):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        values = logits[b, ids]
        logits[b, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def filter_top_k_top_p(logits, top_k, top_p):
    """Set logits outside the top-k and outside the smallest set with probability >= top_p to -inf."""
    logits = logits.copy()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(logits, vocab - top_k, axis=-1)[:, vocab - top_k][:, None]  # [B,1]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")  # [B,V]
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = softmax(sorted_logits)
        before = np.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        drop_sorted = before >= top_p  # always keeps the best token
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = -np.inf
    return logits


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


class TokenChooser:
    """Applies a GenerationConfig to one step's logits."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits, seen):
        cfg = self.config
        logits = np.asarray(logits, np.float32)
        if cfg.vocab_limit is not None and cfg.vocab_limit < logits.shape[-1]:
            logits = logits.copy()
            logits[:, cfg.vocab_limit:] = -np.inf
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        if not cfg.do_sample:
            return np.argmax(logits, axis=-1)
        logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
        probs = softmax(logits.astype(np.float64))
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs])
