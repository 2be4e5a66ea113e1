"""Preference pairs: JSONL records {"prompt", "chosen", "rejected"} and the padded batches made of them.

`prompt` is a string, or a list of chat messages (rendered with the chat template, generation prompt
opened); `chosen` / `rejected` are the two completions of that prompt, the first preferred. Every bad
record is reported as FILE:LINE; a file whose chosen equals its rejected in every record is refused
(there is nothing to learn from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError, require_file
from ..fileio import iter_jsonl

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    where: str  # FILE:LINE, for messages about this record


def read_pairs(path: str | Path, chat_template: str | None = None) -> list[Pair]:
    from .chat import apply_chat_template

    p = require_file(path, "preference pairs file")
    pairs: list[Pair] = []
    for lineno, obj in iter_jsonl(p):
        where = f"{p}:{lineno}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected an object with fields {', '.join(map(repr, FIELDS))}")
        for k in FIELDS:
            if k not in obj:
                raise UserError(f"{where}: missing field {k!r} (expected {', '.join(map(repr, FIELDS))})")
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            try:
                prompt = apply_chat_template(prompt, chat_template, add_generation_prompt=True)
            except UserError as e:
                raise UserError(f"{where}: prompt: {e}") from None
        for k, v in (("prompt", prompt), ("chosen", obj["chosen"]), ("rejected", obj["rejected"])):
            if not isinstance(v, str):
                raise UserError(f"{where}: field {k!r} must be a string, got {type(v).__name__}")
        if not obj["chosen"] or not obj["rejected"]:
            raise UserError(f"{where}: 'chosen' and 'rejected' must not be empty")
        pairs.append(Pair(prompt, obj["chosen"], obj["rejected"], where))
    if not pairs:
        raise UserError(f"{p}: no records")
    if all(x.chosen == x.rejected for x in pairs):
        raise UserError(f"{p}:1: 'chosen' equals 'rejected' in every record (no preference to learn)")
    return pairs


def split_pairs(pairs: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded shuffle, the first round(n * val_fraction) held out."""
    import random

    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_val = int(round(len(order) * val_fraction))
    if len(order) - n_val < 1:
        raise UserError("no training pairs left after holding out the validation share")
    return order[n_val:], order[:n_val]


def encode_completion(tokenizer, prompt: str, completion: str, max_len: int, eos: bool) -> tuple[list[int], int]:
    """(prompt + completion [+ EOS] ids, prompt length), at most max_len ids: the oldest prompt tokens go
    first, then the completion's tail (the completion is what is compared)."""
    p = list(tokenizer.encode(prompt, allowed_special="all")) if prompt else []
    c = list(tokenizer.encode(completion, allowed_special="all")) + ([tokenizer.eos_id] if eos else [])
    c = c[:max_len - 1] if p else c[:max_len]
    keep = max_len - len(c)
    p = p[len(p) - keep:] if keep > 0 else []
    if not p:  # the first token has no prediction: start from EOS so every completion token is scored
        p = [tokenizer.eos_id]
        c = c[: max_len - 1]
    return p + c, len(p)


def pad_batch(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids [B, T], completion_mask [B, T]): the mask is 1 on completion tokens, 0 on the
    prompt and the padding (TRL's `completion_mask`)."""
    T = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        idx[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, n_prompt: len(ids)] = 1
    return idx, mask


def token_logps(model, idx: torch.Tensor) -> torch.Tensor:
    """log p(idx[:, t + 1] | idx[:, :t + 1]) for every position, [B, T - 1]."""
    logits = model(idx).logits[:, :-1].float()
    return torch.gather(logits.log_softmax(-1), 2, idx[:, 1:].unsqueeze(-1)).squeeze(-1)


def completion_logps(model, idx: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum over completion tokens of log p(token | tokens before it), one value per row [B]."""
    per_token = token_logps(model, idx)
    return (per_token * completion_mask[:, 1:].to(per_token.dtype)).sum(-1)
