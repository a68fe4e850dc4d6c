"""Host-side token choice against transformers' logits processors (the pip-installable reference)."""
import numpy as np
import pytest

from visual_mllm.generation.sampling import (GenerationConfig, TokenChooser, apply_repetition_penalty,
                                             filter_top_k_top_p)

torch = pytest.importorskip("torch")
generation = pytest.importorskip("transformers.generation.logits_process")


def random_logits(batch=3, vocab=50, seed=0):
    return np.random.default_rng(seed).normal(0, 3, (batch, vocab)).astype(np.float32)


@pytest.mark.parametrize("penalty", [1.2, 0.8])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits()
    seen = [[1, 2, 2, 7], [0], [49, 3, 10]]
    ours = apply_repetition_penalty(logits, seen, penalty)
    width = max(map(len, seen))
    ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in seen])  # repeats change nothing
    theirs = generation.RepetitionPenaltyLogitsProcessor(penalty)(ids, torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.4), (100, 0.4), (10, 0.9), (1, 1.0)])
def test_top_k_top_p_keep_the_same_tokens_as_transformers(top_k, top_p):
    logits = random_logits(seed=top_k)
    ours = filter_top_k_top_p(logits, top_k, top_p)
    scores = torch.tensor(logits)
    if top_k:
        scores = generation.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = generation.TopPLogitsWarper(top_p)(None, scores)
    np.testing.assert_array_equal(np.isfinite(ours), torch.isfinite(scores).numpy())
    assert np.isfinite(ours).sum(-1).min() >= 1


def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = random_logits()
    greedy = TokenChooser(GenerationConfig(max_new_tokens=1))
    np.testing.assert_array_equal(greedy(logits, [[]] * 3), logits.argmax(-1))
    from visual_mllm.families import get

    config = GenerationConfig(max_new_tokens=1, seed=7, **get("visualglm").sampling)  # VisualGLM's demo settings
    draws = [TokenChooser(config)(logits, [[]] * 3) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    kept = np.isfinite(filter_top_k_top_p(logits / config.temperature, config.top_k, config.top_p))
    assert all(kept[b, t] for b, t in enumerate(draws[0]))


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1]], np.float32))
    chooser = TokenChooser(GenerationConfig(max_new_tokens=1, do_sample=True, seed=0))
    counts = np.bincount([chooser(logits, [[]])[0] for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(top_p=0.0), dict(do_sample=True, temperature=0),
                                 dict(top_k=-1)])
def test_bad_generation_settings_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**{"max_new_tokens": 4, **bad})
