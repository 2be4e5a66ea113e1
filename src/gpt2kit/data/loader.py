"""Batches from token shards: packed windows or padded documents, rank-aware, resumable.

Both modes walk a per-epoch permutation of *units* (packed: aligned chunks of `block_size` tokens;
padded: documents). The permutation is drawn from `(seed, epoch)`, truncated to a multiple of
`world_size`, and rank r takes every world_size-th unit starting at r -- so within an epoch two ranks
never read the same unit, and every rank draws the same number of batches. The cursor is three ints
(epoch, position in this rank's list, step), so `state_dict()` fits in JSON or a weights_only torch file.

Packed mode: chunk k of epoch e covers tokens [off_e + k*C, off_e + (k+1)*C] (C = block_size, C+1 tokens
so the last target exists); off_e is a per-epoch random shift so epochs see different alignments. A
batch of length T <= C takes a random T+1 window inside each of its chunks.

Padded mode: one document per row, `[EOS] + doc + [EOS]` cut or padded (with EOS) to T+1 tokens. The
leading EOS is the separator that precedes the document in the packed stream, so the first document
token is a target, as it is in packed mode. `loss_mask` is False exactly on padding targets; the EOS
that ends the document stays a target. Documents longer than T are truncated.

Dynamic sequence length: `seq_len_sampler(step, rng) -> T` is called once per batch with a generator
seeded by `(seed, step)` (not the rank, so all ranks agree on T). See `UniformLengths` and
`ScheduledLengths`, or `parse_seq_len_sampler("uniform:128,256,512")`.

The memmap is opened anew for every batch: a long-lived np.memmap keeps every page it touched
resident, so RSS grows to the size of the shard (nanoGPT issue #287).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from ..errors import UserError
from .meta import DTYPES, document_ends, read_meta, split_path

STATE_FORMAT = 1


class Batch(NamedTuple):
    idx: torch.Tensor  # LongTensor [B, T]: input ids
    targets: torch.Tensor  # LongTensor [B, T]: idx shifted left by one
    loss_mask: torch.Tensor | None  # BoolTensor [B, T]: False where the target is padding; None = all True


class SeqLenSampler(Protocol):
    def __call__(self, step: int, rng: np.random.Generator) -> int: ...


class UniformLengths:
    """T drawn per batch from `choices` (uniformly, or with `weights`)."""

    def __init__(self, choices: Sequence[int], weights: Sequence[float] | None = None):
        if not choices or any(int(c) < 1 for c in choices):
            raise UserError(f"sequence-length choices must be positive integers, got {list(choices)}")
        self.choices = [int(c) for c in choices]
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if len(w) != len(self.choices) or (w < 0).any() or w.sum() <= 0:
                raise UserError(f"sequence-length weights must be {len(self.choices)} non-negative numbers")
            self.p = w / w.sum()
        else:
            self.p = None

    @property
    def max_len(self) -> int:
        return max(self.choices)

    def __call__(self, step: int, rng: np.random.Generator) -> int:
        return int(self.choices[rng.choice(len(self.choices), p=self.p)])

    def __repr__(self) -> str:
        return f"UniformLengths({self.choices}, p={None if self.p is None else self.p.tolist()})"


class ScheduledLengths:
    """T by step: `[(0, 128), (1000, 256), (5000, 1024)]` uses 128 from step 0, 256 from step 1000, ..."""

    def __init__(self, schedule: Sequence[tuple[int, int]]):
        sched = sorted((int(s), int(t)) for s, t in schedule)
        if not sched or sched[0][0] != 0 or any(t < 1 for _, t in sched):
            raise UserError(f"sequence-length schedule must start at step 0 with positive lengths, got {schedule}")
        self.starts = [s for s, _ in sched]
        self.lengths = [t for _, t in sched]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def __call__(self, step: int, rng: np.random.Generator) -> int:
        return self.lengths[bisect.bisect_right(self.starts, step) - 1]

    def __repr__(self) -> str:
        return f"ScheduledLengths({list(zip(self.starts, self.lengths))})"


def parse_seq_len_sampler(spec: str) -> SeqLenSampler:
    """`uniform:128,256,512`, `uniform:128@1,512@3` (weights) or `schedule:0=128,1000=256,5000=1024`."""
    kind, _, body = spec.partition(":")
    try:
        if kind == "uniform":
            items = [x.split("@") for x in body.split(",") if x]
            choices = [int(x[0]) for x in items]
            weights = [float(x[1]) for x in items] if all(len(x) == 2 for x in items) else None
            return UniformLengths(choices, weights)
        if kind == "schedule":
            pairs = [x.split("=") for x in body.split(",") if x]
            return ScheduledLengths([(int(s), int(t)) for s, t in pairs])
    except ValueError:
        pass
    raise UserError(
        f"bad sequence-length spec {spec!r}: expected 'uniform:128,256,512', 'uniform:128@1,512@3' "
        "or 'schedule:0=128,1000=256'"
    )


def _to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t if str(device) == "cpu" else t.to(device)


class ShardLoader:
    """Endless, deterministic, rank-disjoint batches from `data_dir/<split>.bin` (see the module doc)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        batch_size: int = 8,
        block_size: int = 1024,
        mode: str = "packed",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seq_len_sampler: SeqLenSampler | None = None,
        device: str | torch.device = "cpu",
    ):
        if mode not in ("packed", "padded"):
            raise UserError(f"loader mode must be 'packed' or 'padded', got {mode!r}")
        if batch_size < 1 or block_size < 1:
            raise UserError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(data_dir)
        self.split, self.mode, self.seed = split, mode, int(seed)
        self.batch_size, self.block_size = int(batch_size), int(block_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seq_len_sampler = seq_len_sampler
        self.device = device
        self.path = split_path(data_dir, split)
        self.dtype = DTYPES[self.meta["dtype"]]
        self.eos = int(self.meta["eos_id"])
        self.n_tokens = int(self.meta["splits"][split]["tokens"])
        if not self.path.exists() or self.path.stat().st_size != self.n_tokens * self.dtype.itemsize:
            raise UserError(f"shard file {self.path} is missing or does not match meta.json: prepare the data again")
        if mode == "packed":
            if self.n_tokens - 1 < world_size * block_size:
                raise UserError(
                    f"split {split!r} of {data_dir} has {self.n_tokens} tokens: too few for "
                    f"{world_size} rank(s) x block_size {block_size} (need at least {world_size * block_size + 1})"
                )
        else:
            self.doc_ends = document_ends(data_dir, split, self.meta).astype(np.int64)
            if len(self.doc_ends) < world_size:
                raise UserError(
                    f"split {split!r} of {data_dir} has {len(self.doc_ends)} documents: fewer than "
                    f"world_size {world_size}"
                )
        self.epoch = 0
        self.position = 0
        self.step = 0
        self._order_cache: tuple[int, np.ndarray, int] | None = None

    # --- the per-epoch plan -------------------------------------------------------------------------
    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, int]:
        """(this rank's unit ids for `epoch`, packed-mode token offset of the epoch)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1], self._order_cache[2]
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        if self.mode == "packed":
            c = self.block_size
            # a random shift per epoch, small enough that every rank still gets a chunk
            offset = int(rng.integers(0, min(c, self.n_tokens - 1 - self.world_size * c + 1)))
            n_units = (self.n_tokens - 1 - offset) // c
        else:
            offset, n_units = 0, len(self.doc_ends)
        usable = n_units - n_units % self.world_size
        order = rng.permutation(n_units)[:usable][self.rank :: self.world_size]
        self._order_cache = (epoch, order, offset)
        return order, offset

    def _seq_len(self, step: int) -> int:
        if self.seq_len_sampler is None:
            return self.block_size
        t = int(self.seq_len_sampler(step, np.random.default_rng([self.seed, step, 0x7E])))
        if not 1 <= t <= self.block_size:
            raise UserError(f"sequence-length sampler gave {t}, outside [1, block_size={self.block_size}]")
        return t

    def _take_units(self) -> list[tuple[int, int, int]]:
        """Advance the cursor by batch_size units; returns (epoch, unit id, epoch offset) per row."""
        rows: list[tuple[int, int, int]] = []
        while len(rows) < self.batch_size:
            order, offset = self._epoch_plan(self.epoch)
            take = order[self.position : self.position + self.batch_size - len(rows)]
            rows.extend((self.epoch, int(u), offset) for u in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    # --- batches ------------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        t = self._seq_len(self.step)
        rows = self._take_units()
        data = np.memmap(self.path, dtype=self.dtype, mode="r")  # re-opened per batch (nanoGPT #287)
        if self.mode == "packed":
            rng = np.random.default_rng([self.seed, self.step, self.rank, 0xB0])
            c = self.block_size
            starts = np.array([off + u * c for _, u, off in rows], dtype=np.int64)
            starts += rng.integers(0, c - t + 1, size=len(rows))  # a window of T+1 inside the chunk
            window = np.asarray(data[starts[:, None] + np.arange(t + 1)], dtype=np.int64)
            mask = None
        else:
            window = np.full((len(rows), t + 1), self.eos, dtype=np.int64)
            mask_np = np.zeros((len(rows), t), dtype=bool)
            for i, (_, u, _) in enumerate(rows):
                begin = int(self.doc_ends[u - 1]) if u > 0 else 0
                doc = data[begin : min(int(self.doc_ends[u]) - 1, begin + t)]  # without its EOS, at most T
                window[i, 1 : 1 + len(doc)] = doc
                mask_np[i, : len(doc) + 1] = True  # every doc token and the EOS after it are targets
            mask = torch.from_numpy(mask_np)
        del data
        self.step += 1
        idx = torch.from_numpy(window[:, :-1].copy())
        targets = torch.from_numpy(window[:, 1:].copy())
        dev = self.device
        return Batch(_to_device(idx, dev), _to_device(targets, dev), None if mask is None else _to_device(mask, dev))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    @property
    def batches_per_epoch(self) -> int:
        order, _ = self._epoch_plan(self.epoch)
        return len(order) // self.batch_size

    # --- resumable cursor ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "split": self.split,
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError("data loader state is not a gpt2kit loader state (format 1)")
        for key in ("split", "mode", "seed", "rank", "world_size", "block_size"):
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"data loader state has {key}={state.get(key)!r} but this loader has {getattr(self, key)!r}: "
                    "resume with the same data settings"
                )
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), int(state["step"])


def iter_eval_batches(
    data_dir: str | os.PathLike,
    split: str = "val",
    batch_size: int = 8,
    block_size: int = 1024,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Fixed, non-overlapping windows that predict every token of the split (after the first) once.

    Window k has inputs tokens[kT : kT+T] and targets tokens[kT+1 : kT+T+1]. The last window may be
    short: it is padded with EOS and that batch carries a loss_mask (False on the padding); every other
    batch has loss_mask None. With world_size > 1, rank r gets windows r, r+W, r+2W, ...
    """
    meta = read_meta(data_dir)
    n = int(meta["splits"][split]["tokens"])
    if n < 2:
        raise UserError(f"split {split!r} of {data_dir} is empty: prepare it with --val-fraction > 0")
    path = split_path(data_dir, split)
    dtype = DTYPES[meta["dtype"]]
    if not path.exists() or path.stat().st_size != n * dtype.itemsize:
        raise UserError(f"shard file {path} is missing or does not match meta.json: prepare the data again")
    eos = int(meta["eos_id"])
    n_windows = -(-(n - 1) // block_size)
    mine = list(range(rank, n_windows, world_size))
    for b in range(0, len(mine), batch_size):
        data = np.memmap(path, dtype=dtype, mode="r")
        ks = mine[b : b + batch_size]
        window = np.full((len(ks), block_size + 1), eos, dtype=np.int64)
        mask_np = np.ones((len(ks), block_size), dtype=bool)
        for i, k in enumerate(ks):
            chunk = data[k * block_size : min(n, k * block_size + block_size + 1)]
            window[i, : len(chunk)] = chunk
            mask_np[i, len(chunk) - 1 :] = False
        del data
        idx = torch.from_numpy(window[:, :-1].copy())
        targets = torch.from_numpy(window[:, 1:].copy())
        mask = None if mask_np.all() else _to_device(torch.from_numpy(mask_np), device)
        yield Batch(_to_device(idx, device), _to_device(targets, device), mask)
