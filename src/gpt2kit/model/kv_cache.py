"""A preallocated key/value cache, so each new token attends to the past without recomputing it.

Keys and values of every layer live in fixed buffers [B, n_head, max_len, head_dim]. A forward pass with
`kv_cache=cache` writes its T new positions at [length, length + T) and then advances `length`; decoding
one token therefore costs O(length) attention work, never a recomputation of the prefix.

Attention variants (model/attention.py) keep less, per layer: a sliding-window layer a rolling buffer of
`window` positions (slot = position mod window), a linear-attention layer its fixed-size state (S
[B, H, D, D], z [B, H, D], float32) and no keys at all. `allocate(..., full=True)` keeps every position in
every layer instead (what a cache that is cropped or copied column by column needs: speculative
decoding, the server's batch cache); the variant layers then read their pattern off the full buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass
class KVCache:
    keys: list[torch.Tensor | None]  # per layer [B, H, max_len, hd]; [B, H, window, hd] rolling; None: state
    values: list[torch.Tensor | None]
    length: int = 0  # positions filled so far (the same for every row of the batch)
    states: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # linear layers' (S, z)
    capacity: int | None = None  # max_len, where layer 0 has no full buffer to read it off

    @classmethod
    def allocate(cls, config, batch_size: int, max_len: int | None = None, device=None, dtype=None,
                 full: bool = False) -> KVCache:
        """Empty buffers for `batch_size` sequences of up to `max_len` (default: config.n_ctx) positions.

        Sliding-window layers get a rolling buffer of `window` positions and linear layers a state, unless
        full=True (every layer keeps every position)."""
        max_len = config.n_ctx if max_len is None else int(max_len)
        if max_len < 1 or max_len > config.n_ctx:
            raise UserError(f"KV cache max_len must be in [1, n_ctx={config.n_ctx}], got {max_len}")
        if batch_size < 1:
            raise UserError(f"KV cache batch_size must be >= 1, got {batch_size}")
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        dtype = dtype or torch.get_default_dtype()
        kinds = ("dense",) * config.n_layer if full else config.layer_attention
        if all(kind in ("dense", "fixed") for kind in kinds):
            keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
            values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
            return cls(keys, values, 0)
        keys, values, states = [], [], []
        for kind in kinds:
            if kind == "linear":
                D = config.head_dim
                states.append((torch.zeros(batch_size, config.n_head, D, D, device=device, dtype=torch.float32),
                               torch.zeros(batch_size, config.n_head, D, device=device, dtype=torch.float32)))
                keys.append(None)
                values.append(None)
                continue
            length = min(config.window, max_len) if kind == "sliding" else max_len
            keys.append(torch.zeros(shape[:2] + (length, shape[3]), device=device, dtype=dtype))
            values.append(torch.zeros(shape[:2] + (length, shape[3]), device=device, dtype=dtype))
            states.append(None)
        return cls(keys, values, 0, states, max_len)

    def _buffers(self) -> list[torch.Tensor]:
        return [t for t in self.keys if t is not None] + [t for s in self.states or [] if s for t in s]

    @property
    def max_len(self) -> int:
        return self.capacity if self.capacity is not None else self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self._buffers()[0].shape[0]

    @property
    def n_layer(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self._buffers()[0].device

    @property
    def dtype(self) -> torch.dtype:
        return next(t for t in self.keys if t is not None).dtype if any(t is not None for t in self.keys) \
            else self.states[0][0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers and states (what the cache costs in memory)."""
        return sum(t.numel() * t.element_size() for t in self._buffers()) + sum(
            t.numel() * t.element_size() for t in self.values if t is not None)

    def __len__(self) -> int:
        return self.length

    def reset(self) -> None:
        """Forget every position (buffers are kept and overwritten by the next forward; states zeroed)."""
        self.length = 0
        for s in self.states or []:
            if s is not None:
                s[0].zero_()
                s[1].zero_()

    @property
    def can_rewind(self) -> bool:
        """False when a layer has a rolling buffer or a state: neither can go back to an earlier length."""
        return not self.states or all(s is None for s in self.states) and not any(
            self.is_rolling(i) for i in range(self.n_layer))

    def crop(self, length: int) -> None:
        """Rewind to the first `length` positions (e.g. to drop rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a KV cache of length {self.length} to {length}")
        if length < self.length and not self.can_rewind:
            raise UserError("a sliding-window or linear-attention KV cache cannot be rewound; allocate it with "
                            "full=True")
        self.length = length

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only the given batch rows, in that order (beam search, dropping finished sequences)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [None if k is None else k.index_select(0, rows) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows) for v in self.values]
        if self.states:
            self.states = [None if s is None else (s[0].index_select(0, rows), s[1].index_select(0, rows))
                           for s in self.states]

    # ----- variant layers ---------------------------------------------------------------------------

    def has_state(self, layer: int) -> bool:
        return bool(self.states) and self.states[layer] is not None

    def state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A linear layer's (S, z) after `length` positions (None before the first)."""
        return self.states[layer] if self.length else None

    def set_state(self, layer: int, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        S, z = self.states[layer]
        S.copy_(state[0])
        z.copy_(state[1])

    def is_rolling(self, layer: int) -> bool:
        k = self.keys[layer]
        return k is not None and k.shape[2] < self.max_len

    def rolling_prefix(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last min(n, length) keys/values of a rolling layer, oldest first (copies)."""
        W = self.keys[layer].shape[2]
        n = min(n, self.length, W)
        slots = torch.arange(self.length - n, self.length, device=self.keys[layer].device) % W
        return self.keys[layer].index_select(2, slots), self.values[layer].index_select(2, slots)

    def roll_write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new keys/values into a rolling layer (only the last `window` of them stay)."""
        self._check_room(k.shape[2])
        W = self.keys[layer].shape[2]
        T = k.shape[2]
        m = min(T, W)
        slots = torch.arange(self.length + T - m, self.length + T, device=k.device) % W
        self.keys[layer].index_copy_(2, slots, k[:, :, T - m:])
        self.values[layer].index_copy_(2, slots, v[:, :, T - m:])

    def roll_step(self, layer: int, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None):
        """Write one new position into a rolling layer; return (keys, values, slot validity [B, n] or None)
        of every filled slot, in slot order (attention over them is order-free). padding [B, length + 1]."""
        self._check_room(1)
        W = self.keys[layer].shape[2]
        P = self.length
        slot = P % W
        self.keys[layer][:, :, slot: slot + 1] = k
        self.values[layer][:, :, slot: slot + 1] = v
        n = min(P + 1, W)
        valid = None
        if padding is not None:
            s = torch.arange(n, device=k.device)
            valid = padding[:, P - (P - s) % W]  # the column each slot holds now
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n], valid

    def _check_room(self, T: int) -> None:
        if self.length + T > self.max_len:
            raise UserError(f"KV cache is full: {self.length} positions + {T} new > max_len {self.max_len}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new [B, H, T, hd] keys/values after the filled positions; return all keys/values so far.

        `length` is not advanced here: every layer writes at the same offset, and the model calls
        `advance(T)` once after the last layer.
        """
        start, end = self.length, self.length + k.shape[2]
        self._check_room(k.shape[2])
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
