"""A decode-only forward pass for CPU at small batch: one new token per row, on the KV cache.

Why it exists: decoding one token reads every weight once and does ~2 flops per weight, so it is bound
by memory bandwidth. On the CPUs we measured, torch's float32 matrix-*vector* path (F.linear at batch 1)
reads weights at well under half the memory bandwidth, while numpy's BLAS `W @ x` runs near it (see
docs/generate.md). This module runs the same network as `gpt2kit.model.GPT2.forward` for a [B, 1] input,
with numpy arrays that *share memory* with the model's parameters and the KV cache buffers: nothing is
copied, the model stays the single owner of its weights, and the cache a prefill wrote through
`model.forward` is the cache this path reads and extends.

Float32 models: exact up to float32 rounding (logits agree with model.forward to ~1e-5). Quantized models
(gpt2kit.model.quantized): each projection runs through its layer's small-batch kernel, which reads the
int8/int4 codes directly -- the same kernel model.forward uses for so few rows -- and everything else
(layer norms, attention, the cache) is this module's float32 code. Used by gpt2kit.generate only where it
applies: CPU, float32 activations, eval mode, batch <= MAX_BATCH, a kernel for every projection.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Above this many rows a decode step is a real matrix-matrix product, which torch already does well: 8 rows
# with BLAS's products, 32 with gpt2kit's own float32 kernel (model/native/gemm_f32.c), which reads each
# weight row once for all rows; measured on a 2-core Xeon (AVX-512) over gpt2's 49 products: 1.7x torch at
# 4 rows, 1.5x at 16, 1.2x at 32, 1.0x at 64 (docs/serve.md).
MAX_BATCH = 8
NATIVE_MAX_BATCH = 32


def _native_f32():
    """gpt2kit's float32 small-batch product, or None where the native kernels are unavailable."""
    from .model import native

    return native.f32_linear if native.library() is not None else None


def _native_attention():
    """gpt2kit's batched decode attention, or None where the native kernels are unavailable."""
    from .model import native

    return native.decode_attention if native.library() is not None else None


def max_batch() -> int:
    """The most rows FastDecoder runs on this machine."""
    return NATIVE_MAX_BATCH if _native_f32() is not None else MAX_BATCH


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU float32 tensor's storage (contiguous, so BLAS reads it in one sweep)."""
    a = t.detach().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


class _Linear:
    """One projection's weight [out, in] and bias, as numpy views and as the torch tensors they view."""

    __slots__ = ("w", "b", "w_t", "b_t", "native")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.w_t = weight.detach()
        self.b_t = None if bias is None else bias.detach()
        self.w = _np(self.w_t)
        self.b = None if bias is None else _np(self.b_t)
        self.native = _native_f32()

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = x @ w.T + b for x [B, in]."""
        if self.native is not None and x.shape[0] > 1:
            # a few rows: gpt2kit's kernel reads each weight row once for all of them (BLAS: 1.5x slower at
            # 16 rows here). At one row numpy's BLAS gemv stays: the kernel is as fast alone but was slower
            # on the server's scheduler thread (44 vs 37 tok/s for one client; docs/serve.md)
            return self.native(x, self.w, self.b, out)
        if x.shape[0] == 1:
            # batch 1: a BLAS matrix-vector product, numpy's (multi-threaded, near memory bandwidth)
            np.matmul(self.w, x[0], out=out[0])
            if self.b is not None:
                out += self.b
        else:
            # a few rows: numpy's small-M matrix product is slow here; torch's (MKL) is not
            xt, ot = torch.from_numpy(x), torch.from_numpy(out)
            if self.b_t is None:
                torch.mm(xt, self.w_t.t(), out=ot)
            else:
                torch.addmm(self.b_t, xt, self.w_t.t(), out=ot)
        return out


class _KernelLinear:
    """A quantized projection (gpt2kit.model.quantized.QuantLinear) through its small-batch kernel, which
    reads the int8/int4 codes directly; numpy in, numpy out, no copy of the weights."""

    __slots__ = ("kernel",)

    def __init__(self, module, batch_size: int):
        self.kernel = module.small_batch_kernel(batch_size)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return self.kernel(torch.from_numpy(x)).numpy()  # a fresh array, as the caller may modify it


def _projection(module, batch_size: int):
    if type(module) is torch.nn.Linear:
        return _Linear(module.weight, module.bias)
    return _KernelLinear(module, batch_size)


def _projection_supported(module, batch_size: int) -> bool:
    if type(module) is torch.nn.Linear:
        return module.weight.dim() == 2
    kernel = getattr(module, "small_batch_kernel", None)
    return kernel is not None and kernel(batch_size) is not None


class _Embedding:
    """Rows of a token/position table: a numpy view of a float table, or a quantized table's lookup."""

    __slots__ = ("table", "module")

    def __init__(self, module):
        self.module = module
        self.table = _np(module.weight) if type(module) is torch.nn.Embedding else None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[rows]
        return self.module(torch.from_numpy(np.ascontiguousarray(rows))).float().numpy()


class _Layer:
    __slots__ = ("ln1_w", "ln1_b", "qkv", "proj", "ln2_w", "ln2_b", "fc", "out")

    def __init__(self, block, batch_size: int):
        self.ln1_w, self.ln1_b = _np(block.ln_1.weight), _np(block.ln_1.bias)
        self.qkv = _projection(block.attn.c_attn, batch_size)
        self.proj = _projection(block.attn.c_proj, batch_size)
        self.ln2_w, self.ln2_b = _np(block.ln_2.weight), _np(block.ln_2.bias)
        self.fc = _projection(block.mlp.c_fc, batch_size)
        self.out = _projection(block.mlp.c_proj, batch_size)


class FastDecoder:
    """`decoder(tok [B, 1], cache, mask [B, P + 1] | None, pos [B, 1] | None) -> logits [B, V]`."""

    @staticmethod
    def supports(model, batch_size: int) -> bool:
        from .model.quantized import QuantEmbedding, QuantTiedHead

        if not 1 <= batch_size <= max_batch():
            return False
        if not getattr(getattr(model, "config", None), "is_gpt2", False):
            return False  # a variant (MoE, shared layers, attention patterns): the model's own forward
        try:
            t = model.transformer
            wte, head = t.wte, model.lm_head
            projections = [m for b in t.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
            if type(wte) is torch.nn.Embedding:
                tied = type(head) is torch.nn.Linear and head.weight.data_ptr() == wte.weight.data_ptr()
            else:  # a quantized table: the head must read the same codes
                tied = type(wte) is QuantEmbedding and isinstance(head, QuantTiedHead) and head.store is wte.store
            ok = (
                tied
                and type(t.wpe) in (torch.nn.Embedding, QuantEmbedding)
                and all(_projection_supported(m, batch_size) for m in projections)
                and _projection_supported(head, batch_size)
            )
        except (AttributeError, IndexError, TypeError):
            return False
        return (
            ok
            and model.device.type == "cpu"
            and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
            and not model.training
        )

    def __init__(self, model):
        config = model.config
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.eps = float(config.layer_norm_epsilon)
        self.vocab_size = config.vocab_size
        self.n_embd = config.n_embd
        self.model = model
        self.wte = _Embedding(model.transformer.wte)
        self.wpe = _Embedding(model.transformer.wpe)
        self.lnf_w, self.lnf_b = _np(model.transformer.ln_f.weight), _np(model.transformer.ln_f.bias)
        # projections are bound per batch size (a quantized kernel may depend on the row count)
        self._layers: dict[int, tuple[list[_Layer], object]] = {}
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._cache_views: tuple[int, list[np.ndarray], list[np.ndarray]] | None = None
        self._attention = _native_attention()
        self._native_step: object | None | bool = False  # built at the first batch-1 step; None: not here

    def _network(self, B: int) -> tuple[list[_Layer], object]:
        if B not in self._layers:
            t = self.model.transformer
            self._layers[B] = ([_Layer(b, B) for b in t.h], _projection(self.model.lm_head, B))
        return self._layers[B]

    # ----- scratch space, allocated once per batch size -----------------------------------------------

    def _scratch(self, B: int) -> dict[str, np.ndarray]:
        if B not in self._buffers:
            C = self.n_embd
            f32 = np.float32
            self._buffers[B] = {
                "h": np.empty((B, C), f32),
                "qkv": np.empty((B, 3 * C), f32),
                "att": np.empty((B, C), f32),
                "proj": np.empty((B, C), f32),
                "fc": np.empty((B, 4 * C), f32),
                "tmp": np.empty((B, 4 * C), f32),
                "logits": np.empty((B, self.vocab_size), f32),
            }
        return self._buffers[B]

    def _cache(self, cache) -> tuple[list[np.ndarray], list[np.ndarray]]:
        key = id(cache.keys[0])
        if self._cache_views is None or self._cache_views[0] != key:
            ks = [k.numpy() for k in cache.keys]
            vs = [v.numpy() for v in cache.values]
            self._cache_views = (key, ks, vs)
        return self._cache_views[1], self._cache_views[2]

    def _batch1_step(self):
        if self._native_step is False:
            from .decode_native import NativeStep

            self._native_step = NativeStep.build(self.model)
        return self._native_step

    # ----- the step -----------------------------------------------------------------------------------

    def __call__(self, tok: torch.Tensor, cache, mask: torch.Tensor | None, pos: torch.Tensor | None):
        B = tok.shape[0]
        P = cache.length
        if P + 1 > cache.max_len:
            from .errors import UserError

            raise UserError(f"KV cache is full: {P} positions + 1 new > max_len {cache.max_len}")
        buf = self._scratch(B)
        keys, values = self._cache(cache)
        ids = tok.reshape(B).numpy()
        positions = np.full(B, P) if pos is None else pos.reshape(B).numpy()
        keep = None if mask is None else mask.numpy()  # [B, P + 1], True = real token
        if B == 1 and cache.keys[0].shape[0] == 1:
            step = self._batch1_step()
            if step is not None:  # the whole step in one C call (gpt2kit.decode_native)
                step(int(ids[0]), int(positions[0]), cache, keep, buf["logits"][0])
                return torch.from_numpy(buf["logits"])
        x = self.wte(ids) + self.wpe(positions)  # [B, C], a fresh array: the residual stream
        layers, head = self._network(B)

        H, D = self.n_head, self.head_dim
        C = H * D
        scale = np.float32(1.0 / math.sqrt(D))
        for i, L in enumerate(layers):
            h = _layer_norm(x, L.ln1_w, L.ln1_b, self.eps, buf["h"])
            qkv = L.qkv(h, buf["qkv"])
            q = qkv[:, :C].reshape(B, H, 1, D)
            K, V = keys[i], values[i]  # [B, H, max_len, D] views of the cache buffers
            K[:, :, P, :] = qkv[:, C : 2 * C].reshape(B, H, D)
            V[:, :, P, :] = qkv[:, 2 * C :].reshape(B, H, D)
            att = buf["att"]
            if self._attention is not None and B > 1:  # one C call, not one BLAS call per (row, head)
                self._attention(qkv, K, V, P + 1, keep, float(scale), att)
            else:
                att[...] = _attention(q, K[:, :, : P + 1, :], V[:, :, : P + 1, :], keep, scale).reshape(B, C)
            x += L.proj(att, buf["proj"])
            h = _layer_norm(x, L.ln2_w, L.ln2_b, self.eps, buf["h"])
            f = _gelu_tanh(L.fc(h, buf["fc"]), buf["tmp"])
            x += L.out(f, buf["proj"])
        cache.advance(1)
        h = _layer_norm(x, self.lnf_w, self.lnf_b, self.eps, buf["h"])
        logits = head(h, buf["logits"])
        # a view of the scratch buffer: valid until the next step, which is all a sampler needs
        return torch.from_numpy(logits)


def _attention(q: np.ndarray, K: np.ndarray, V: np.ndarray, keep: np.ndarray | None, scale) -> np.ndarray:
    """softmax(q K^T * scale) V for q [B, H, 1, D] over K, V [B, H, T, D]; keep [B, T] False = masked."""
    scores = np.matmul(q, K.transpose(0, 1, 3, 2))  # [B, H, 1, T]
    scores *= scale
    if keep is not None:
        scores[~np.broadcast_to(keep[:, None, None, :], scores.shape)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, V)  # [B, H, 1, D]


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    np.subtract(x, mean, out=out)
    var = np.mean(out * out, axis=-1, keepdims=True)
    out *= 1.0 / np.sqrt(var + np.float32(eps))
    out *= w
    out += b
    return out


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def _gelu_tanh(x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """GPT-2's GELU (tanh approximation), in place on x: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    np.multiply(x, x, out=tmp)
    tmp *= np.float32(0.044715)
    tmp += np.float32(1.0)
    tmp *= x
    tmp *= _GELU_C
    np.tanh(tmp, out=tmp)
    tmp += np.float32(1.0)
    x *= tmp
    x *= np.float32(0.5)
    return x
