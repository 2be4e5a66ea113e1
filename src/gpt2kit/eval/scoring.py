"""Log-likelihood of continuations given contexts: the one primitive every evaluation shares.

A request is `(context ids, continuation ids)`. Its score is the summed log-probability of the
continuation tokens, each conditioned on everything before it, plus whether every continuation token is
the model's argmax ("greedy"). This is lm-evaluation-harness's `loglikelihood`:

- the model sees `(context + continuation)[-(n_ctx + 1):][:-1]`, so a context too long for the window is
  cut from the left and the final token (which predicts nothing we score) is not fed;
- requests are sorted longest first (a batch that does not fit in memory fails at once, and rows of a
  batch have similar lengths) and right-padded; causal attention means padding after a row's last real
  token cannot change that row's logits, so no attention mask is needed;
- the output head runs only at the scored positions (see `_HeadAtPositions`) and log-softmax is taken
  there in float32: for GPT-2 the head is the largest matrix product, and a task scores a handful of
  positions per row, so most of the [B, T, V] logits would be computed only to be thrown away.

A "model" is anything callable as `model(idx)` returning an object with `.logits` of shape [B, T, V]
(gpt2kit's GPT2, transformers' GPT2LMHeadModel, or a hand-made module in tests); its context length is
`model.config.n_ctx` (or `n_positions`) unless given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class Request:
    """Score `continuation` after `context` (both token ids; the context must not be empty)."""

    context: Sequence[int]
    continuation: Sequence[int]


@dataclass
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    greedy: bool  # every continuation token is the argmax of its distribution
    n_tokens: int  # len(continuation)
    token_logprobs: list[float] | None = None  # per token, when asked for


def model_context_length(model) -> int:
    """The number of positions a model can attend over (`config.n_ctx`, or HF's `n_positions`)."""
    config = getattr(model, "config", None)
    for name in ("n_ctx", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length: pass n_ctx")


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class _HeadAtPositions(torch.nn.Module):
    """Stands in for `model.lm_head` for one call: applies the head to the hidden states at the given
    (row, column) positions only, returning logits [1, N, V] in that order.

    GPT-2 implementations (gpt2kit's GPT2, transformers' GPT2LMHeadModel, quantized variants) end with
    `logits = self.lm_head(hidden)`, so swapping the module is enough; the result is the same numbers
    as the full head at those positions (a matrix product row by row).
    """

    def __init__(self, head: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__()
        self.head, self.rows, self.cols = head, rows, cols

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden[self.rows, self.cols].unsqueeze(0))


@contextlib.contextmanager
def _head_at_positions(model, rows: torch.Tensor, cols: torch.Tensor):
    head = model.lm_head
    model.lm_head = _HeadAtPositions(head, rows, cols)
    try:
        yield
    finally:
        model.lm_head = head


def _logits_at_positions(model, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
    """Logits [N, V] at (rows, cols) with the head run only there, or None if the model does not end
    in `self.lm_head(hidden)` (no such module, or its forward uses the head some other way)."""
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Module):
        return None
    try:
        with _head_at_positions(model, rows, cols):
            logits = model(idx).logits
    except (AttributeError, TypeError, IndexError, RuntimeError):
        return None
    if logits.dim() != 3 or logits.shape[:2] != (1, len(rows)):
        return None
    return logits[0]


def _model_input(request: Request, n_ctx: int) -> list[int]:
    if len(request.context) == 0:
        raise ValueError("a request's context must hold at least one token (use EOS for no context)")
    if len(request.continuation) == 0:
        raise ValueError("a request's continuation must hold at least one token")
    if len(request.continuation) > n_ctx:
        raise UserError(
            f"a continuation of {len(request.continuation)} tokens does not fit the model's context of {n_ctx}"
        )
    whole = list(request.context) + list(request.continuation)
    return whole[-(n_ctx + 1) :][:-1]


@torch.inference_mode()
def score_requests(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    n_ctx: int | None = None,
    keep_token_logprobs: bool = False,
    progress: bool = False,
    desc: str = "scoring",
    select_positions: bool = True,
) -> list[Score]:
    """Score every request; results come back in the order of `requests`.

    select_positions: run the model's `lm_head` (when it has one) only where a token is scored;
    False computes the full logits and picks the same rows from them.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    n_ctx = n_ctx or model_context_length(model)
    device = model_device(model)
    inputs = [_model_input(r, n_ctx) for r in requests]
    # Longest first; ties keep the input order so results are deterministic.
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    results: list[Score | None] = [None] * len(requests)

    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    bar = _progress(len(requests), desc, progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(inputs[batch[0]])
            idx = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols, targets, counts = [], [], [], []
            for b, i in enumerate(batch):
                inp, cont = inputs[i], requests[i].continuation
                idx[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                # The last len(cont) positions of the fed sequence predict the continuation tokens.
                first = len(inp) - len(cont)
                rows.extend([b] * len(cont))
                cols.extend(range(first, len(inp)))
                targets.extend(cont)
                counts.append(len(cont))
            row_t, col_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            picked = None
            if select_positions:
                picked = _logits_at_positions(model, idx.to(device), row_t, col_t)
                select_positions = picked is not None  # a model it does not work for: stop trying
            if picked is None:
                picked = model(idx.to(device)).logits[row_t, col_t]
            logprobs = torch.log_softmax(picked.float(), dim=-1)
            target = torch.tensor(targets, device=device)
            token_lp = logprobs.gather(1, target[:, None])[:, 0].double().cpu()
            is_greedy = (logprobs.argmax(dim=-1) == target).cpu()
            for i, lp, gr in zip(batch, token_lp.split(counts), is_greedy.split(counts)):
                results[i] = Score(
                    logprob=float(lp.sum()),
                    greedy=bool(gr.all()),
                    n_tokens=len(lp),
                    token_logprobs=lp.tolist() if keep_token_logprobs else None,
                )
            bar.update(len(batch))
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return results  # type: ignore[return-value]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None lets tqdm switch itself off when stderr is not a terminal.
    return tqdm(total=total, desc=desc, unit="req", disable=None if enabled else True, leave=False)
