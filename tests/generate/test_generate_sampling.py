"""Sampling filters keep exactly the right candidates, on hand-made distributions and against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2kit.errors import UserError
from gpt2kit.sampling import (
    apply_repetition_penalty,
    filter_logits,
    greedy,
    next_token,
    sample,
    seen_tokens,
    top_k_filter,
    top_p_filter,
    validate_sampling,
)


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in probs]])


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert kept(top_k_filter(logits, 2)) == [[1, 3], [0, 1]]
    assert kept(top_k_filter(logits, 1)) == [[1], [0]]
    assert kept(top_k_filter(logits, 5)) == [[0, 1, 2, 3, 4]] * 2
    assert kept(top_k_filter(logits, 50)) == [[0, 1, 2, 3, 4]] * 2


def test_top_k_keeps_ties_with_the_kth_value():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert kept(top_k_filter(logits, 2)) == [[1, 2, 3]]


def test_top_k_leaves_kept_logits_unchanged():
    logits = torch.randn(3, 100)
    out = top_k_filter(logits, 10)
    keep = torch.isfinite(out)
    assert keep.sum(-1).tolist() == [10, 10, 10]
    assert torch.equal(out[keep], logits[keep])


@pytest.mark.parametrize(
    ("probs", "p", "expected"),
    [
        ([0.5, 0.25, 0.125, 0.125], 0.5, [0]),  # the top token alone reaches p
        ([0.5, 0.25, 0.125, 0.125], 0.6, [0, 1]),
        ([0.5, 0.25, 0.125, 0.125], 0.75, [0, 1]),  # exactly p: no more tokens needed
        ([0.5, 0.25, 0.125, 0.125], 0.76, [0, 1, 2]),  # ties: the lower id comes first
        ([0.125, 0.25, 0.5, 0.125], 0.875, [1, 2, 0]),
        ([0.125, 0.25, 0.5, 0.125], 0.9, [0, 1, 2, 3]),
        ([0.5, 0.25, 0.125, 0.125], 1.0, [0, 1, 2, 3]),
        ([0.9, 0.05, 0.05], 0.01, [0]),  # the most probable token is always kept
        ([0.5, 0.5, 0.0], 1.0, [0, 1]),  # zero-probability tokens are never candidates
    ],
)
def test_top_p_smallest_set_reaching_p(probs, p, expected):
    assert sorted(kept(top_p_filter(logits_of(probs), p))[0]) == sorted(expected)


def test_top_p_ties_are_broken_by_token_id_not_by_sort_order():
    # 6 equal probabilities: p = 0.5 needs exactly 3 of them, and they must be the 3 lowest ids
    logits = torch.zeros(1, 6)
    assert kept(top_p_filter(logits, 0.5)) == [[0, 1, 2]]


def test_top_p_and_top_k_match_transformers_on_random_distributions():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1000, generator=g) * 3
    for p in (0.1, 0.5, 0.9, 0.95):
        ours = kept(top_p_filter(logits, p))
        theirs = kept(TopPLogitsWarper(top_p=p)(None, logits.clone()))
        assert ours == theirs
    for k in (1, 7, 50):
        assert kept(top_k_filter(logits, k)) == kept(TopKLogitsWarper(top_k=k)(None, logits.clone()))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    ours = apply_repetition_penalty(logits, seen_tokens(ids, 50), 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(penalty=1.3)(ids, logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_repetition_penalty_signs():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_seen_tokens_ignores_padding_but_not_real_repeats():
    ids = torch.tensor([[7, 7, 3, 1], [0, 0, 5, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    seen = seen_tokens(ids, 10, mask)
    assert torch.nonzero(seen[0]).flatten().tolist() == [1, 3, 7]
    assert torch.nonzero(seen[1]).flatten().tolist() == [0, 5]


def test_filter_order_temperature_then_top_p():
    # temperature flattens the distribution first, so top-p needs more tokens than at T=1
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert kept(filter_logits(logits, temperature=1.0, top_p=0.7)) == [[0]]
    assert kept(filter_logits(logits, temperature=10.0, top_p=0.7)) == [[0, 1, 2]]


def test_greedy_and_sampling_respect_the_candidate_set():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]]).repeat(64, 1)
    assert greedy(logits).tolist() == [1] * 64
    assert next_token(logits, temperature=0.0).tolist() == [1] * 64
    g = torch.Generator().manual_seed(0)
    draws = next_token(logits, temperature=1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 3}


def test_sampling_is_reproducible_and_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    a = sample(logits, torch.Generator().manual_seed(5))
    b = sample(logits, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / a.numel()
    assert torch.allclose(freq, probs, atol=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_k": 0},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": float("inf")},
    ],
)
def test_invalid_sampling_values_are_user_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(UserError, match=name):
        validate_sampling(**kwargs)


@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])  # flat (nucleus of thousands) .. peaked (a few tokens)
def test_top_p_candidate_search_equals_the_full_sort(scale):
    from gpt2kit.sampling import _top_p_full_sort

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50257, generator=g) * scale
    logits[1, :100] = logits[1, 100]  # a block of ties
    for p in (0.05, 0.5, 0.9, 0.99):
        fast, full = top_p_filter(logits, p), _top_p_full_sort(logits, p)
        assert torch.equal(torch.isfinite(fast), torch.isfinite(full))
        assert torch.equal(fast[torch.isfinite(fast)], logits[torch.isfinite(full)])


def test_top_p_tie_at_the_candidate_boundary_falls_back_to_the_exact_answer():
    from gpt2kit.sampling import _top_p_full_sort

    logits = torch.full((1, 1000), -5.0)
    logits[0, 500:700] = 1.0  # 200 equal top tokens: more than the first candidate batch
    out = top_p_filter(logits, 0.5)
    assert torch.equal(torch.isfinite(out), torch.isfinite(_top_p_full_sort(logits, 0.5)))
    kept_ids = kept(out)[0]
    assert kept_ids == list(range(500, 500 + len(kept_ids)))  # the lowest ids among the ties


def test_sample_never_draws_a_removed_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 50257, generator=g)
    logits[:, ::2] = float("-inf")
    draws = sample(logits, g)
    assert (draws % 2 == 1).all() and ((0 <= draws) & (draws < 50257)).all()
