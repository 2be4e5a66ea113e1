"""Sampling filters: pure functions from next-token logits [B, V] to filtered logits or token ids.

Filters mark removed candidates with -inf, so they compose in any order and a softmax afterwards gives the
renormalised distribution over what is left. Every filter is deterministic: ties are resolved by value
(top-k keeps every token tied with the k-th largest logit) or by token id (top-p orders equal
probabilities by ascending id), never by the internal order of a sort kernel.

The order applied by `filter_logits` is the one `transformers` uses: repetition penalty, temperature,
top-k, top-p.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError


def validate_sampling(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
) -> None:
    """Raise UserError naming the first invalid sampling value."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k must be an integer >= 1 (or None to disable), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0)):
        raise UserError(f"top_p must be in (0, 1] (or None to disable), got {top_p!r}")
    if repetition_penalty is not None and (
        not isinstance(repetition_penalty, (int, float))
        or not math.isfinite(repetition_penalty)
        or repetition_penalty <= 0
    ):
        raise UserError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by `temperature` (> 0). Temperature 0 means greedy and is handled by the caller."""
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding: use greedy() instead of dividing by zero")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (and every logit tied with the k-th); set the rest to -inf."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose total probability is >= p.

    Tokens are ranked by probability, equal probabilities by ascending token id (a stable sort), and a
    token is kept when the probability mass ranked strictly before it is still below p. The most probable
    token is therefore always kept, and p = 1 keeps every token with non-zero probability.

    The nucleus is usually a few dozen tokens, so it is first looked for among the top candidates
    (torch.topk, ~20x cheaper than sorting a 50k vocabulary); the full sort runs only when the answer
    is not decided there (a nucleus larger than the candidates, or a tie across their boundary).
    """
    if p >= 1.0:
        return logits
    V = logits.size(-1)
    norm = _softmax_norm(logits)
    k = _TOP_P_CANDIDATES
    while k < V:
        vals, ids = _top_candidates(logits, k)
        probs = torch.exp(vals.float() - norm[0]) / norm[1]
        keep = (torch.cumsum(probs, dim=-1) - probs) < p
        keep[..., 0] = True
        n_keep = keep.sum(-1, keepdim=True)  # keep is a prefix: mass before a token only grows
        last_kept = vals.gather(-1, n_keep - 1)
        # decided here iff a candidate was dropped and no token outside the candidates ties the last kept
        if bool(((n_keep < k) & (last_kept > vals[..., -1:])).all()):
            out = torch.full_like(logits, float("-inf"))
            return out.scatter_(-1, ids, vals.masked_fill(~keep, float("-inf")))
        k *= 8
    return _top_p_full_sort(logits, p, norm)


_TOP_P_CANDIDATES = 64


def _softmax_norm(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(logit - max)) per row: probabilities computed as softmax computes them."""
    m = logits.float().amax(dim=-1, keepdim=True)
    return m, torch.exp(logits.float() - m).sum(dim=-1, keepdim=True)


def _top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits per row and their ids, ordered by value (descending) then id (ascending)."""
    vals, ids = torch.topk(logits, k, dim=-1)
    ids, by_id = torch.sort(ids, dim=-1)
    vals = vals.gather(-1, by_id)
    vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
    return vals, ids.gather(-1, order)


def _top_p_full_sort(logits: torch.Tensor, p: float, norm=None) -> torch.Tensor:
    """top_p_filter by sorting the whole vocabulary (the reference the candidate search must agree with)."""
    m, denom = _softmax_norm(logits) if norm is None else norm
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_probs = torch.exp(sorted_logits.float() - m) / denom
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(-1, sorted_ids, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019), as in `transformers`.

    For every token already in the row's context (`seen`, bool [B, V]), a positive logit is divided by
    `penalty` and a negative one multiplied by it, so penalty > 1 always makes repeats less likely.
    Each token is penalised once, however often it occurred.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def seen_tokens(ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, V]: which token ids occur in each row of `ids` [B, T] (only where `mask` is true)."""
    seen = torch.zeros(ids.size(0), vocab_size, dtype=torch.bool, device=ids.device)
    if ids.size(1) == 0:
        return seen
    hits = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    # scatter with reduce: a padding position must not clear a real occurrence of the same id
    return seen.scatter_reduce_(1, ids, hits, reduce="amax")


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply repetition penalty, temperature (> 0), top-k and top-p in that order."""
    if repetition_penalty is not None and repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs `seen` (which tokens each row has used)")
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Most likely token per row, [B] (the lowest id among exact ties, like torch.argmax)."""
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits), [B]; reproducible for a given generator state.

    Inverse-CDF sampling with one uniform number per row: exact for the categorical distribution (up
    to float32 rounding of the cumulative sum), never picks a zero-probability token, and ~10x cheaper
    than torch.multinomial on a 50k vocabulary.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=logits.device, dtype=cdf.dtype)
    # u * total < total, so some cdf entry exceeds it; the first one that does is the drawn token
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token per row, [B]: greedy at temperature 0, otherwise a filtered sample."""
    if temperature == 0:
        if repetition_penalty is not None and repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        return greedy(logits)
    return sample(filter_logits(logits, temperature, top_k, top_p, repetition_penalty, seen), generator)
