"""A preallocated key/value cache, so each new token attends to the past without recomputing it.

Keys and values of every layer live in fixed buffers [B, n_head, max_len, head_dim]. A forward pass with
`kv_cache=cache` writes its T new positions at [length, length + T) and then advances `length`; decoding
one token therefore costs O(length) attention work, never a recomputation of the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # one [B, H, max_len, hd] buffer per layer
    values: list[torch.Tensor]
    length: int = 0  # positions filled so far (the same for every row of the batch)

    @classmethod
    def allocate(cls, config, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """Empty buffers for `batch_size` sequences of up to `max_len` (default: config.n_ctx) positions."""
        max_len = config.n_ctx if max_len is None else int(max_len)
        if max_len < 1 or max_len > config.n_ctx:
            raise UserError(f"KV cache max_len must be in [1, n_ctx={config.n_ctx}], got {max_len}")
        if batch_size < 1:
            raise UserError(f"KV cache batch_size must be >= 1, got {batch_size}")
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        dtype = dtype or torch.get_default_dtype()
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(keys, values, 0)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def n_layer(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def __len__(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget every position (buffers are kept and overwritten by the next forward)."""
        self.length = 0

    def crop(self, length: int) -> None:
        """Rewind to the first `length` positions (e.g. to drop rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a KV cache of length {self.length} to {length}")
        self.length = length

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows, in that order (beam search, dropping finished sequences)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new [B, H, T, hd] keys/values after the filled positions; return all keys/values so far.

        `length` is not advanced here: every layer writes at the same offset, and the model calls
        `advance(T)` once after the last layer.
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise UserError(
                f"KV cache is full: {self.length} positions + {k.shape[2]} new > max_len {self.max_len}"
            )
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
