"""The whole batch-1 decode step of a plain GPT-2 in one C call (model/native/decode_step.c).

Why: one row's step streams every weight once, so it should take as long as reading them. Through
gpt2kit.decode_fast's numpy network, gpt2's step made ~35 numpy calls a layer and 49 products that each
opened their own thread region: about 1 ms of a 3.4 ms int4 step on a Zen 5 EPYC. Here the C side runs
the step in a single OpenMP region, with the residual adds and GELU fused into the products that feed them.

What it reads: the model's own parameters and the KV cache's buffers, by address, nothing copied;
float32 projections as nn.Linear holds them, quantized ones through the buffers of their batch-1 kernel
(`_Int4Native`'s blocks, `_Int8Native`'s signed codes), so a quantized layer gives what its own kernel
gives. `NativeStep.build(model)` returns None where any piece does not fit (then decode_fast's numpy
step runs); GPT2KIT_FUSED_DECODE=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

_F32, _INT4, _INT8 = 0, 1, 2


class _Proj(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("rows", ctypes.c_int), ("cols", ctypes.c_int), ("w", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1_w", ctypes.c_void_p), ("ln1_b", ctypes.c_void_p), ("ln2_w", ctypes.c_void_p),
                ("ln2_b", ctypes.c_void_p), ("qkv", _Proj), ("proj", _Proj), ("fc", _Proj), ("out", _Proj),
                ("k", ctypes.c_void_p), ("v", ctypes.c_void_p)]


class _Table(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("rows", ctypes.c_int), ("cols", ctypes.c_int), ("groups", ctypes.c_int),
                ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


class _Net(ctypes.Structure):
    _fields_ = [("wte", _Table), ("wpe", _Table), ("n_layer", ctypes.c_int), ("n_head", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("max_len", ctypes.c_int), ("eps", ctypes.c_float), ("sh", ctypes.c_longlong),
                ("st", ctypes.c_longlong), ("layers", ctypes.POINTER(_Layer)), ("lnf_w", ctypes.c_void_p),
                ("lnf_b", ctypes.c_void_p), ("head", _Proj), ("streams", ctypes.c_int),
                ("prefetch_f32", ctypes.c_int), ("prefetch_q", ctypes.c_int)]


def row_reading() -> tuple[int, int, int]:
    """(streams per thread, software prefetch distance in bytes for float32 rows, for quantized rows).

    Measured, same process, interleaved builds (docs/benchmarks.md): on a Zen 5 EPYC one stream, no
    prefetch for float32 (10.3 against 11.9 ms for gpt2's step with 2 streams and 8 KB ahead) and 8 KB
    for int4 / int8 rows (1.67 / 2.77 ms against 1.74 / 3.15 without). On Intel the int4 kernel's own
    tuning (gemv.c, a Xeon VM: two streams, 8 KB ahead) is kept for quantized rows. GPT2KIT_DECODE_ROWS
    ="streams,prefetch_f32,prefetch_q" overrides (for tuning on a new CPU)."""
    from .errors import UserError
    from .model.linear import _cpu_vendor

    env = os.environ.get("GPT2KIT_DECODE_ROWS", "").strip()
    if env:
        try:
            streams, pf, pq = (int(v) for v in env.split(","))
        except ValueError:
            raise UserError(f"GPT2KIT_DECODE_ROWS must be 'streams,prefetch_f32,prefetch_q' (integers), got {env!r}") from None
        if not 1 <= streams <= 8 or not 0 <= pf <= 1 << 20 or not 0 <= pq <= 1 << 20:
            raise UserError(f"GPT2KIT_DECODE_ROWS: streams in [1, 8], prefetch bytes in [0, 1048576], got {env!r}")
        return streams, pf, pq
    if _cpu_vendor() == "GenuineIntel":
        return 2, 0, 8192
    return 1, 0, 8192


def enabled() -> bool:
    return os.environ.get("GPT2KIT_FUSED_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach()
    return t if t.dtype == torch.float32 and t.is_contiguous() else None


class NativeStep:
    """`step(token, position, cache, keep [P + 1] bool | None, logits [V] float32 numpy)`: one row's step
    on its cache (its new key and value at cache.length, which then advances), the logits out."""

    @classmethod
    def build(cls, model) -> NativeStep | None:
        """A step for this model, or None where the native step does not apply."""
        if not enabled():
            return None
        from .model import native

        lib = native.library()
        if lib is None or not hasattr(lib, "gpt2kit_decode_step"):
            return None
        try:
            return cls(model, lib)
        except _Unsupported:
            return None

    def __init__(self, model, lib):
        config = model.config
        t = model.transformer
        self._lib = lib
        self._keep_alive: list[torch.Tensor] = []
        C = config.n_embd
        layers = (_Layer * config.n_layer)()
        for i, block in enumerate(t.h):
            L = layers[i]
            L.ln1_w, L.ln1_b = self._ptr(block.ln_1.weight), self._ptr(block.ln_1.bias)
            L.ln2_w, L.ln2_b = self._ptr(block.ln_2.weight), self._ptr(block.ln_2.bias)
            L.qkv = self._proj(block.attn.c_attn, (3 * C, C))
            L.proj = self._proj(block.attn.c_proj, (C, C))
            fc = block.mlp.c_fc
            L.fc = self._proj(fc, (getattr(fc, "out_features", 0), C))
            L.out = self._proj(block.mlp.c_proj, (C, L.fc.rows))
            if i and L.fc.rows != layers[0].fc.rows:
                raise _Unsupported("layers of different widths")
        net = _Net()
        net.wte, net.wpe = self._table(t.wte), self._table(t.wpe)
        if net.wte.cols != C or net.wpe.cols != C:
            raise _Unsupported("embedding tables of another width")
        net.n_layer, net.n_head, net.head_dim = config.n_layer, config.n_head, C // config.n_head
        net.eps = float(config.layer_norm_epsilon)
        net.layers = layers
        net.lnf_w, net.lnf_b = self._ptr(t.ln_f.weight), self._ptr(t.ln_f.bias)
        net.head = self._proj(model.lm_head, (config.vocab_size, C))
        net.streams, net.prefetch_f32, net.prefetch_q = row_reading()
        self._layers, self._net = layers, net
        self._net_ref = ctypes.byref(net)
        self._cache_key: tuple | None = None

    # ----- the network's description ------------------------------------------------------------------

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        f = _f32(t)
        if f is None:
            raise _Unsupported("a parameter that is not contiguous float32")
        self._keep_alive.append(f)
        return f.data_ptr()

    def _proj(self, module, shape: tuple[int, int]) -> _Proj:
        from .model.quantized import _Int4Native, _Int8Native

        rows, cols = shape
        p = _Proj()
        p.rows, p.cols = rows, cols
        if type(module) is torch.nn.Linear:
            if tuple(module.weight.shape) != shape:
                raise _Unsupported(f"weight {list(module.weight.shape)}, expected {list(shape)}")
            p.kind, p.w = _F32, self._ptr(module.weight)
            p.bias = self._ptr(module.bias)
            return p
        kernel = getattr(module, "small_batch_kernel", lambda rows: None)(1)
        if (getattr(module, "out_features", None), getattr(module, "in_features", None)) != shape:
            raise _Unsupported("a projection of another shape")
        if isinstance(kernel, _Int4Native):
            p.kind, p.w = _INT4, self._keep(kernel.blocks)
        elif isinstance(kernel, _Int8Native):
            p.kind, p.w = _INT8, self._keep(kernel.codes_s8)
            p.scale, p.zero = self._keep(kernel.scales), self._keep(kernel.zeros)
        else:
            raise _Unsupported(f"no native batch-1 kernel for {type(module).__name__}")
        p.bias = None if kernel.bias is None else self._ptr(kernel.bias)
        if cols % 32:
            raise _Unsupported("quantized rows that are not whole blocks of 32")
        return p

    def _table(self, module) -> _Table:
        from .model.quantized import QuantEmbedding

        e = _Table()
        if type(module) is torch.nn.Embedding:
            e.kind, e.w, e.groups = _F32, self._ptr(module.weight), 1
            e.rows, e.cols = module.weight.shape
            return e
        if type(module) is not QuantEmbedding:
            raise _Unsupported(f"an embedding of type {type(module).__name__}")
        store = module.store
        if store.device.type != "cpu":
            raise _Unsupported("an embedding table off the CPU")
        e.kind = _INT4 if store.bits == 4 else _INT8
        e.w = self._keep(store.qweight if store.bits == 4 else store.codes_s8)
        e.scale, e.zero = self._keep(store.scales), self._keep(store.zeros)
        e.rows, e.cols, e.groups = store.rows, store.cols, store.scales.shape[1]
        return e

    def _keep(self, t: torch.Tensor) -> int:
        if not t.is_contiguous():
            raise _Unsupported("a kernel buffer that is not contiguous")
        self._keep_alive.append(t)
        return t.data_ptr()

    def _bind(self, cache) -> None:
        """Point each layer at this cache's buffers (row 0), once per cache."""
        key = (id(cache), *(k.data_ptr() for k in cache.keys))
        if key == self._cache_key:
            return
        k0 = cache.keys[0]
        for k, v in zip(cache.keys, cache.values):
            if (k.dtype != torch.float32 or k.stride() != k0.stride() or v.stride() != k0.stride()
                    or k.shape != k0.shape or v.shape != k0.shape or k.stride(3) != 1):
                raise ValueError("the native decode step needs float32 cache buffers of one layout")
        for L, k, v in zip(self._layers, cache.keys, cache.values):
            L.k, L.v = k.data_ptr(), v.data_ptr()
        self._net.sh, self._net.st = k0.stride(1), k0.stride(2)
        self._net.max_len = k0.shape[2]
        self._cache_key = key

    # ----- the step -----------------------------------------------------------------------------------

    def __call__(self, token: int, position: int, cache, keep: np.ndarray | None, logits: np.ndarray) -> None:
        self._bind(cache)
        P = cache.length
        mask = self._mask(keep, P + 1)
        rc = self._lib.gpt2kit_decode_step(self._net_ref, token, position, P, None if mask is None else mask.ctypes.data,
                                           logits.ctypes.data, torch.get_num_threads())
        self._check(rc, f"token {token} or position {position}", P)
        cache.advance(1)

    def rows(self, tokens: np.ndarray, position: int, cache, keep: np.ndarray | None, logits: np.ndarray,
             all_logits: bool = True) -> None:
        """T tokens of one sequence in one call: tokens [T] at positions position .. position + T - 1, into
        the cache at cache.length (which advances by T); logits [T, V] (all_logits) or the last one's [V].
        Each row's logits are bitwise those of T successive single steps (decode_step.c)."""
        self._bind(cache)
        P = cache.length
        ids = np.ascontiguousarray(tokens.reshape(-1), dtype=np.int32)
        T = ids.shape[0]
        want = (T, self._net.head.rows) if all_logits else (self._net.head.rows,)
        if logits.shape != want or logits.dtype != np.float32 or not logits.flags.c_contiguous:
            raise ValueError(f"logits must be contiguous float32 {list(want)}, got {logits.dtype} {list(logits.shape)}")
        mask = self._mask(keep, P + T)
        rc = self._lib.gpt2kit_decode_rows(self._net_ref, ids.ctypes.data, T, position, P,
                                           None if mask is None else mask.ctypes.data, logits.ctypes.data,
                                           int(all_logits), torch.get_num_threads())
        self._check(rc, f"tokens {ids.min()}..{ids.max()} or positions {position}..{position + T - 1}", P)
        cache.advance(T)

    @staticmethod
    def _mask(keep: np.ndarray | None, columns: int) -> np.ndarray | None:
        """The key mask as contiguous bytes (the caller holds it through the C call)."""
        if keep is None:
            return None
        keep = np.ascontiguousarray(keep.reshape(-1), dtype=np.bool_)
        if keep.shape[0] != columns:
            raise ValueError(f"mask has {keep.shape[0]} columns for {columns} positions")
        return keep

    @staticmethod
    def _check(rc: int, what: str, P: int) -> None:
        if rc == -2:
            raise IndexError(f"{what} outside the model's tables, or the cache full at {P}")
        if rc:
            raise MemoryError("native decode step: out of memory for its scratch rows")


class _Unsupported(Exception):
    pass
