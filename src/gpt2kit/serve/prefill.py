"""Batched, chunked prefill: the prompts admitted together are prefilled together, a bounded number of
tokens at a time, so the sequences already decoding are never held up by more than one chunk.

A `PrefillGroup` is several prompts left-padded to the longest: ids [k, T] with a padding mask [k, T].
The model computes each row as it would alone (padding keys are masked; a row's positions count only its
real tokens; see GPT2Network.forward), and the group's batch-k KVCache then holds each row's keys/values in
its last `length` columns, where `BatchCache.add` copies them from. `step(columns)` runs the next
`columns` positions of every row (a forward on the same cache, as a chunked prefill in vLLM), so one long
prompt costs several short pauses of the decode loop instead of one long one.

`plan_groups` sorts one admission by prompt length and cuts it where padding would grow past
`MAX_PADDING` x the real tokens: a short prompt does not pay for a long one's length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..model.kv_cache import KVCache
from ..model.quantized import generation_prefill

# a group's padded size (rows x longest prompt) stays within this factor of its real tokens (+ slack)
MAX_PADDING = 1.25
_PADDING_SLACK = 16


@dataclass(eq=False)
class PrefillGroup:
    rows: list[list]  # the sequences each row starts (the n > 1 choices of one prompt share a row)
    lengths: list[int]  # real tokens per row
    ids: torch.Tensor  # [k, T] left-padded token ids
    mask: torch.Tensor | None  # [k, T] bool, True = real token; None when no row is padded
    cache: KVCache  # batch k, T columns
    full_logits: bool = False  # keep every position's logits (prompt logprobs; then k == 1)
    done: int = 0  # columns prefilled so far
    last: torch.Tensor | None = None  # [k, V] float logits after each row's last prompt token, once finished
    parts: list[torch.Tensor] = field(default_factory=list)  # [T_chunk, V] logits per chunk (full_logits)

    @classmethod
    def build(cls, rows: list[list], prompts: list[list[int]], config, device, dtype,
              full_logits: bool = False) -> PrefillGroup:
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, T - len(p):] = True
        # full=True: the batch cache copies every layer's columns (attention variants too)
        cache = KVCache.allocate(config, len(prompts), T, device, dtype, full=True)
        return cls(rows, lengths, ids.to(device), None if bool(mask.all()) else mask.to(device), cache, full_logits)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    @property
    def finished(self) -> bool:
        return self.done >= self.width

    @property
    def sequences(self) -> list:
        return [s for row in self.rows for s in row]

    def step(self, model, columns: int) -> int:
        """Prefill the next `columns` positions of every row; returns the padded tokens computed."""
        a = self.done
        b = min(self.width, a + max(1, columns))
        mask = None if self.mask is None else self.mask[:, :b]
        # a prompt whose own log-probabilities are asked for (echo) is scored exactly; otherwise only its
        # last position's logits count, and quantized products may run in bf16 (generation_prefill)
        with contextlib.nullcontext() if self.full_logits else generation_prefill():
            logits = model(self.ids[:, a:b], kv_cache=self.cache, attention_mask=mask,
                           last_only=not self.full_logits).logits.float()
        self.done = b
        if self.full_logits:
            self.parts.append(logits[0])
        if self.finished:
            self.last = logits[:, -1]
        return (b - a) * len(self.rows)

    def prompt_logits(self) -> torch.Tensor:
        """[T, V] logits at every prompt position (full_logits groups, once finished)."""
        return torch.cat(self.parts, 0)


def plan_groups(prompts: list[list[int]], batchable: bool = True, max_rows: int | None = None,
                max_tokens: int | None = None) -> list[list[int]]:
    """Indices of `prompts` grouped for prefill: by length, each group's padding bounded (see MAX_PADDING),
    and its padded size (rows x longest prompt) at most `max_tokens` where given (a longer prompt alone).

    batchable=False gives one prompt per group (a model whose output depends on its batch)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if not batchable:
        return [[i] for i in order]
    groups: list[list[int]] = []
    real = 0
    for i in order:
        n = len(prompts[i])  # the longest so far: lengths ascend
        g = groups[-1] if groups else None
        if g is not None and (max_rows is None or len(g) < max_rows) and \
                (max_tokens is None or (len(g) + 1) * n <= max_tokens) and \
                (len(g) + 1) * n <= MAX_PADDING * (real + n) + _PADDING_SLACK:
            g.append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return groups
