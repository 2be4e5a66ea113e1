"""A KV cache for sequences that join and leave a running batch (continuous batching).

Rows 0..n-1 hold the active sequences. All rows write their next token at one shared column `length`
(the model's KVCache appends there); a row that joined later simply has its first real column further
right, and the columns before it are masked out (`attention_mask`) with its own `position_ids`. So a row
computes what it computes alone: its tokens at positions 0, 1, 2, ..., attending to its own keys only.

    cache = BatchCache(config, max_batch, dtype)
    row = cache.add(prefill, r, length)    # row r of a prefilled KVCache (its last `length` columns)
    view, mask, pos = cache.step_inputs()  # KVCache view of rows [0, n), [n, length + 1], [n, 1]
    cache.remove(row)                      # the last row moves into its place; returns that old index

Columns are compacted (the leading columns no row uses are dropped) when the buffer fills, and the buffer
grows when a row needs more than it holds; a row's real span never exceeds n_ctx, so neither does the
buffer by more than one column.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import KVCache

_INITIAL_COLUMNS = 128


class BatchCache:
    def __init__(self, config, max_batch: int, dtype: torch.dtype, device=None):
        self.config = config
        self.max_batch = max_batch
        self.dtype = dtype
        self.device = device
        self.n = 0  # active rows
        self.length = 0  # the shared write column
        self.starts: list[int] = []  # first real column of each active row
        self._alloc(min(_INITIAL_COLUMNS, config.n_ctx + 1))

    def _alloc(self, columns: int) -> None:
        c = self.config
        shape = (self.max_batch, c.n_head, columns, c.head_dim)
        old = getattr(self, "keys", None)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]
        if old is not None and self.length:
            for new, prev in zip(keys + values, old + self.values):
                new[:, :, : self.length] = prev[:, :, : self.length]
        self.keys, self.values = keys, values
        self._views: dict[int, KVCache] = {}  # one view object per row count, reused every step
        self.generation = getattr(self, "generation", 0) + 1  # changes whenever the buffers are new

    @property
    def columns(self) -> int:
        return self.keys[0].shape[2]

    def _shift(self, delta: int) -> None:
        """Move every filled column by `delta` (< 0: drop leading columns; > 0: make room on the left)."""
        if delta == 0:
            return
        n, L = self.n, self.length
        for buf in self.keys + self.values:
            if delta < 0:
                buf[:n, :, : L + delta] = buf[:n, :, -delta:L].clone()
            else:
                buf[:n, :, delta : L + delta] = buf[:n, :, :L].clone()
        self.starts = [s + delta for s in self.starts]
        self.length = L + delta

    def _ensure(self, needed_left: int, needed_right: int) -> None:
        """Make `length >= needed_left` and room for `needed_right` more columns after `length`."""
        if self.n == 0:
            self.length = 0
            self.starts = []
        else:
            # compact: no row reads the leading `dead` columns. Not at every retirement: each step reads
            # every column of every row, so dead columns cost reads until dropped, and dropping copies.
            dead = min(self.starts)
            if dead and (dead >= max(16, self.length // 4) or self.length + needed_right > self.columns
                         or self.length < needed_left):
                self._shift(-dead)
        if self.length < needed_left:
            if needed_left + needed_right > self.columns:
                self._alloc(max(needed_left + needed_right, min(2 * self.columns, self.config.n_ctx + 1)))
            self._shift(needed_left - self.length)
        if self.length + needed_right > self.columns:
            self._alloc(max(self.length + needed_right, min(2 * self.columns, self.config.n_ctx + 1)))

    def add(self, prefill: KVCache, row: int = 0, length: int | None = None) -> int:
        """Copy row `row` of a prefilled cache into a new row ending at the shared column; returns that row.

        length: the row's real columns, the last `length` of the prefill (a left-padded group); default all."""
        if self.n >= self.max_batch:
            raise RuntimeError("batch cache is full")
        P = prefill.length
        T = P if length is None else length
        self._ensure(T, 1)
        new, L = self.n, self.length
        for layer in range(self.config.n_layer):
            self.keys[layer][new, :, L - T : L] = prefill.keys[layer][row, :, P - T : P]
            self.values[layer][new, :, L - T : L] = prefill.values[layer][row, :, P - T : P]
        self.starts.append(L - T)
        self.n += 1
        return new

    def remove(self, row: int) -> int | None:
        """Drop a row; the last row moves into its slot. Returns the moved row's old index (or None)."""
        last = self.n - 1
        moved = None
        if row != last:
            for buf in self.keys + self.values:
                buf[row, :, : self.length] = buf[last, :, : self.length]
            self.starts[row] = self.starts[last]
            moved = last
        self.starts.pop()
        self.n -= 1
        return moved

    def step_inputs(self) -> tuple[KVCache, torch.Tensor | None, torch.Tensor]:
        """(cache view of the active rows, attention mask [n, length + 1] or None, positions [n, 1])."""
        self._ensure(0, 1)
        n, L = self.n, self.length
        view = self._views.get(n)
        if view is None:
            view = self._views[n] = KVCache([k[:n] for k in self.keys], [v[:n] for v in self.values], L)
        view.length = L
        starts = torch.tensor(self.starts, dtype=torch.long, device=self.device)
        pos = (L - starts)[:, None]
        mask = None
        if any(self.starts):
            mask = torch.arange(L + 1, device=self.device)[None, :] >= starts[:, None]
        return view, mask, pos

    def advance(self) -> None:
        """The step wrote one column for every row."""
        self.length += 1
