"""Weight-quantized GPT-2: int8 / int4 linear and embedding modules, and loading a quantized checkpoint.

Storage (one scheme for every quantized matrix W [rows, cols], rows = output channels of a linear layer
or tokens/positions of an embedding, cols = the input dimension):
  codes   unsigned b-bit integers, round(W / s) + z clamped to [0, 2^b - 1]
  scales  float32 [rows, cols / group]  (group = cols: one scale per row, "per channel")
  zeros   uint8   [rows, cols / group]  the code that stands for 0.0
  W~ = (codes - zeros) * scales, computed in float32, so a reloaded checkpoint dequantizes bitwise-equal.
int8 codes are stored one per byte (`qweight` [rows, cols]); int4 codes two per byte (`qweight`
[rows, cols / 2], element 2j in the low nibble, 2j + 1 in the high nibble). The tied output head uses
the token embedding's codes: the head *is* the embedding matrix, quantized once. In memory, int8 codes
are held signed (`codes_s8` = code - 128, zero points moved by 128 with them: the same W~ exactly), the
form the int8 kernels read, so they need no copies of their own.

Compute: a layer dequantizes its weight and calls F.linear -- except for a few rows at a time (decoding)
on CPU, where a kernel reads the codes directly (1 or 1/2 byte per weight instead of 4): fbgemm's dynamic
int8 linear at batch 1, torch's int8 / int4 weight-pack kernels for up to 16 rows (see "fast kernels"
below and docs/post.md for the measurements).

Only the head and the embeddings expose a `.weight` (the fused loss reads it); the block
linears deliberately have none, so code that wants raw float weights (e.g. gpt2kit.decode_fast) declines
a quantized model instead of silently dequantizing it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .linear import float_linear

# ----- packing and dequantization (shared with gpt2kit.post.quantize) ----------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], shape [..., 2n] -> uint8 [..., n]: even index low nibble, odd index high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., n] -> uint8 codes [..., 2n]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(codes - zeros) * scales per group; codes [R, C] (integers), scales/zeros [R, C / group]."""
    R, C = codes.shape
    G = scales.shape[-1]
    q = codes.view(R, G, C // G).to(torch.float32)
    w = (q - zeros.to(torch.float32).unsqueeze(-1)) * scales.unsqueeze(-1)
    return w.view(R, C).to(dtype)


class _QuantStore(nn.Module):
    """The buffers of one quantized matrix [rows, cols] and how to read them back."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, cols: int,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if bits not in (4, 8):
            raise UserError(f"quantized weights must have 4 or 8 bits, got {bits}")
        rows = qweight.shape[0]
        want_cols = cols // 2 if bits == 4 else cols
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (rows, want_cols):
            raise UserError(f"quantized weight has dtype {qweight.dtype} shape {list(qweight.shape)}, "
                            f"expected uint8 [{rows}, {want_cols}] for {bits}-bit codes of {cols} columns")
        if scales.dim() != 2 or scales.shape[0] != rows or cols % scales.shape[1] or zeros.shape != scales.shape:
            raise UserError(f"quantization scales {list(scales.shape)} / zeros {list(zeros.shape)} do not fit "
                            f"a [{rows}, {cols}] weight")
        self.bits = bits
        self.rows = rows
        self.cols = cols
        self.group_size = cols // scales.shape[1]
        self.compute_dtype = compute_dtype
        if bits == 8:
            # in memory, int8 codes are kept signed (code - 128): the form both CPU int8 kernels read, so
            # neither needs a copy of its own (files keep the unsigned codes; see file_codes)
            self.register_buffer("codes_s8", (qweight ^ 0x80).view(torch.int8))
        else:
            self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(torch.float32))
        self.register_buffer("zeros", zeros.to(torch.uint8))

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def file_codes(self) -> torch.Tensor:
        """The codes as checkpoints store them: uint8, int4 packed two per byte."""
        return (self.codes_s8.view(torch.uint8) ^ 0x80) if self.bits == 8 else self.qweight

    def codes(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, their zero points) of all rows or of `rows`: W~ = (codes - zeros) * scales."""
        zeros = self.zeros if rows is None else self.zeros[rows]
        if self.bits == 8:  # signed codes, so the zero point moves by 128 too (exact integer arithmetic)
            q = self.codes_s8 if rows is None else self.codes_s8[rows]
            return q, zeros.to(torch.int16) - 128
        q = self.qweight if rows is None else self.qweight[rows]
        return unpack_int4(q), zeros

    def dequantize(self, rows: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """W~ [rows, cols] (or the rows `rows` of it). `out`: a CPU float32 buffer to write the whole matrix
        into where the native kernels run (else ignored): a prefill's products reuse one such buffer."""
        if rows is None:
            if self.device.type == "cpu" and self.compute_dtype == torch.float32:
                from . import native  # one pass in C, bitwise equal to the tensor ops below

                if native.library() is not None:
                    if self.bits == 4:
                        return native.int4_dequantize(self.qweight, self.scales, self.zeros, self.cols, out=out)
                    return native.int8_dequantize(self.codes_s8, self.scales, self.zeros, out=out)
            q, z = self.codes()
            return dequantize(q, self.scales, z, self.compute_dtype)
        flat = rows.reshape(-1)
        q, z = self.codes(flat)
        w = dequantize(q, self.scales[flat], z, self.compute_dtype)
        return w.view(*rows.shape, self.cols)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": self.file_codes(), f"{prefix}.scales": self.scales,
                f"{prefix}.zeros": self.zeros}


# ----- fast kernels for a few rows at a time (decoding) ------------------------------------------------
#
# A decode step multiplies one row per sequence by every weight: it is bound by reading the weights, so
# the win is a kernel that reads the 1-byte (or half-byte) codes directly instead of dequantizing to
# float32 first. Measured here (one pass over all gpt2 weights, batch 1, 2 threads; docs/post.md):
# numpy float32 W @ x 18.1 ms, fbgemm dynamic int8 5.1 ms, torch._weight_int4pack_mm_for_cpu 4.9 ms,
# torch._weight_int8pack_mm 11.0 ms. Each kernel keeps its own packed copy of the codes, built on first
# use; the store's codes stay the source of truth (checkpoints, dequantization).

# Up to this many rows the kernels beat dequantizing (~300 ms for all gpt2 weights, whatever the rows):
# measured per pass over gpt2's projections, 2 threads, int8 weight-only 16 rows 55 ms / 64 rows 165 ms
# / 128 rows 338 ms, int4 g64 64 rows 127 ms / 128 rows 250 ms. So decode steps and short prefills
# (a prompt, or the last position's logits) read codes; long sequences (eval, training) dequantize.
SMALL_BATCH_MAX_ROWS = 64
_INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel accepts


def _cpu_has_vnni() -> bool:
    """AVX-512 VNNI accumulates u8 x s8 products in int32 (no int16 saturation), so fbgemm's dynamic
    int8 kernel can use all 8 bits of the activations; without it, PyTorch's default is 7 bits."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in f)
    except OSError:
        return False


class _Int8Dynamic:
    """Batch 1, int8 per channel: fbgemm's dynamic int8 linear (PyTorch's dynamic quantization kernel).

    The weights are our codes exactly (qint8 = code - 128, zero point = z - 128, same float32 scales);
    the activation row is quantized to uint8 on the fly (per tensor = per row at batch 1), the product is
    accumulated in int32 and rescaled, bias added in float32. Used only for one row, so a row's result
    never depends on which other rows share its batch.
    """

    reduce_range = not _cpu_has_vnni()

    @staticmethod
    def available() -> bool:
        return hasattr(torch.ops.quantized, "linear_dynamic") and "fbgemm" in torch.backends.quantized.supported_engines

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        import warnings

        q_s8 = store.codes_s8
        zero_points = store.zeros[:, 0].to(torch.int64) - 128
        with warnings.catch_warnings():  # quantized-tensor constructors warn about their own future
            warnings.simplefilter("ignore")
            qt = torch._make_per_channel_quantized_tensor(q_s8, store.scales[:, 0].to(torch.float64), zero_points, 0)
            self.packed = torch.ops.quantized.linear_prepack(qt, None if bias is None else bias.float())
        # the resolved overload: torch.ops.<ns>.<op>(...) resolves it in Python on every call
        self._linear = torch.ops.quantized.linear_dynamic.default

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self._linear(x2.float(), self.packed, self.reduce_range)


class _Int8WeightOnly:
    """A few rows, int8 per channel: torch._weight_int8pack_mm, bf16 activations x int8 codes.

    The kernel computes x @ (q_s8 * s)^T with signed codes and no zero point. Our codes are unsigned
    with zero z: W~ = (q - z) s = (q_s8 + 128 - z) s, so y = kernel(x) + sum(x) * (128 - z) s.
    """

    @staticmethod
    def available() -> bool:
        return hasattr(torch, "_weight_int8pack_mm")

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        self.q_s8 = store.codes_s8  # shared with the store, not copied
        s = store.scales[:, 0]
        self.scales = s.to(torch.bfloat16)
        offset = (128 - store.zeros[:, 0].to(torch.float32)) * s
        self.offset = None if bool((offset == 0).all()) else offset
        self.bias = bias

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q_s8, self.scales).float()
        if self.offset is not None:
            y += x2.float().sum(-1, keepdim=True) * self.offset
        if self.bias is not None:
            y += self.bias
        return y


class _Int4Packed:
    """A few rows, int4 in groups of 32-256: torch._weight_int4pack_mm_for_cpu, bf16 activations.

    The kernel computes with w = (q - 8) * scale + offset per group; ours is (q - z) * s, so
    offset = (8 - z) * s. Scales and offsets are bf16 in the kernel (rel. error ~2^-9 of a step).
    It wants a multiple of 16 output rows: the head (50257 rows) is padded with zero rows, sliced off.
    """

    @staticmethod
    def available() -> bool:
        return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")

    @staticmethod
    def fits(store: _QuantStore) -> bool:
        return store.group_size in _INT4_GROUPS and store.cols % store.group_size == 0

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        codes = unpack_int4(store.qweight).to(torch.int32)
        scales, zeros = store.scales, store.zeros.to(torch.float32)
        pad = -store.rows % 16
        if pad:
            codes = torch.cat([codes, codes.new_full((pad, store.cols), 8)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_full((pad, zeros.shape[1]), 8.0)])
        self.rows = store.rows
        self.group_size = store.group_size
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        # [groups, rows, 2]: (scale, offset) per group and output row
        self.scale_offset = torch.stack([scales, (8 - zeros) * scales], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = bias

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group_size, self.scale_offset)
        y = y[:, : self.rows].float()
        if self.bias is not None:
            y += self.bias
        return y


class _Int4Native:
    """Batch 1, int4 in blocks of 32: gpt2kit's own kernel (model/native/gemv.c), compiled for this CPU.

    It streams half a byte per weight plus fp16 (scale, scale * zero) per 32 weights and multiplies in
    8 bits: the activation row is quantized per block of 32 to int8, as llama.cpp does for q4_0. Measured
    on a 2-core Xeon (AVX-512, AVX-VNNI), one gpt2 head product: 24 GB/s, torch's int4 kernel 14-20 GB/s
    on the block projections (docs/benchmarks.md). Used only for one row, so a row's result never depends
    on which other rows share its batch.
    """

    @staticmethod
    def available() -> bool:
        from . import native

        return native.library() is not None

    @staticmethod
    def fits(store: _QuantStore) -> bool:
        from . import native

        return store.cols % native.BLOCK == 0 and native.fits_int4_blocks(store.scales, store.group_size)

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        from . import native

        self.blocks = native.pack_int4_blocks(store.qweight, store.scales, store.zeros, store.group_size)
        self.rows, self.cols = store.rows, store.cols
        self.bias = None if bias is None else bias.float().contiguous()
        self._gemv = native.int4_gemv

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self._gemv(self.blocks, x2, self.bias, self.rows, self.cols)


class _Int8Native:
    """Batch 1, int8 per channel: gpt2kit's own kernel (model/native/gemv_int8.c), compiled for this CPU.

    It reads the store's signed codes where they are (fbgemm keeps a packed copy of every weight: a second
    124 MB for gpt2) and quantizes the activation row per block of 32 to int8, as llama.cpp does for q8_0
    (fbgemm uses one scale for the whole row). Used only for one row, so a row's result never depends on
    which other rows share its batch.
    """

    @staticmethod
    def available() -> bool:
        from . import native

        return native.library() is not None

    @staticmethod
    def fits(store: _QuantStore) -> bool:
        from . import native

        return store.cols % native.BLOCK == 0

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        from . import native

        self.codes_s8 = store.codes_s8  # shared with the store, not copied
        self.scales = store.scales[:, 0].contiguous()
        self.zeros = store.zeros[:, 0].contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self._gemv = native.int8_gemv

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self._gemv(self.codes_s8, self.scales, self.zeros, x2, self.bias)


def _small_batch_kernel_class(store: _QuantStore, rows: int):
    """The kernel class for `rows` input rows of this weight, or None (dequantize + F.linear)."""
    if rows > SMALL_BATCH_MAX_ROWS:
        return None
    if store.bits == 8 and store.group_size == store.cols:
        if rows == 1 and _Int8Native.fits(store) and _Int8Native.available():
            return _Int8Native
        if rows == 1 and _Int8Dynamic.available():
            return _Int8Dynamic
        if _Int8WeightOnly.available():
            return _Int8WeightOnly
    if store.bits == 4 and rows == 1 and _Int4Native.fits(store) and _Int4Native.available():
        return _Int4Native
    if store.bits == 4 and _Int4Packed.available() and _Int4Packed.fits(store):
        return _Int4Packed
    return None


_buffers = threading.local()
# the largest weight dequantized into the reused buffer: gpt2-xl's block weights (10.2M) fit, an output
# head (gpt2: 38.6M, 154 MB) does not, so the buffer never holds a head's worth of memory for good
_DEQUANT_BUFFER_MAX = 16 * 2**20


def _dequant_buffer(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's scratch for one dequantized weight, per dtype, grown to the largest asked for."""
    name = "flat" if dtype == torch.float32 else "flat_bf16"
    buf = getattr(_buffers, name, None)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=dtype)
        setattr(_buffers, name, buf)
    return buf[: rows * cols].view(rows, cols)


# ----- a generation's prefill: products of many rows in bf16 or in 8 bits, where the CPU does those fast --
#
# A prompt's forward multiplies every weight by hundreds of rows: compute-bound, unlike a decode step.
# - bf16: with bf16 dot products (AVX512-BF16, AMX) oneDNN's bf16 GEMM ran 2.1x its float32 one at gpt2's
#   prefill shapes on a Zen 5 EPYC (915-934 against 427-462 GFLOP/s); int4 prefill of 512 tokens went
#   1840 -> 2500 tok/s, int8 2000 -> 2850 (docs/benchmarks.md). The weights are rounded to bf16 after
#   dequantizing (2^-9 of each, well inside their int4/int8 step) and so are the activations.
# - int8 (int4 weights, CPUs with AVX2 but no bf16 dot products): gpt2kit's int4 x int8 GEMM
#   (native/gemm_int4.c), the activations quantized per block of 32 to int8 as llama.cpp's q8_0 does and
#   as the batch-1 kernel already does: 270-280 GOP/s against oneDNN's 200-210 GFLOP/s float32 on a Zen 5
#   core pair limited to AVX2; at 2-64 rows 1.2-2.4x torch's int4 kernel.
# Only inside generation_prefill() (generate, the server, speculative decoding): model.forward elsewhere --
# evaluation, perplexity, training -- stays the exact float32 product of the dequantized weight.
# GPT2KIT_QUANT_PREFILL=auto|bf16|int8|float32 (float32 turns both off).
_in_generation_prefill: contextvars.ContextVar[bool] = contextvars.ContextVar("gpt2kit_generation_prefill",
                                                                               default=False)
QUANT_PREFILL_MODES = ("auto", "bf16", "int8", "float32")


@contextlib.contextmanager
def generation_prefill():
    """Inside, quantized layers may multiply many rows in bf16 or 8 bits (see quant_prefill_mode)."""
    token = _in_generation_prefill.set(True)
    try:
        yield
    finally:
        _in_generation_prefill.reset(token)


def _cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


_auto_mode: str | None = None


def quant_prefill_mode() -> str:
    """How a generation prefill's quantized products run here: "bf16" where the CPU has bf16 dot products
    (bf16 without them runs ~60x slower than float32: ../shared/PERF-NOTES.md), else "int8" where
    gpt2kit's int4 x int8 GEMM is built (AVX2), else "float32". "int8" applies to int4 weights in blocks
    of 32; other quantized weights are multiplied in float32 then."""
    global _auto_mode
    choice = os.environ.get("GPT2KIT_QUANT_PREFILL", "auto").strip().lower()
    choice = "float32" if choice == "fp32" else choice
    if choice not in QUANT_PREFILL_MODES:
        raise UserError(f"GPT2KIT_QUANT_PREFILL must be one of {', '.join(QUANT_PREFILL_MODES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if _auto_mode is None:
        from . import native

        _auto_mode = "bf16" if _cpu_has_bf16_dot() else ("int8" if native.int4_gemm_available() else "float32")
    return _auto_mode


class QuantLinear(nn.Module):
    """y = x W~^T + b with W~ [out, in] held as int8/int4 codes (see the module docstring)."""

    def __init__(self, store: _QuantStore, bias: torch.Tensor | None):
        super().__init__()
        self.store = store
        self.in_features = store.cols
        self.out_features = store.rows
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._kernels: dict[type, object] = {}
        self._kernel_class: dict[int, type | None] = {}

    @property
    def bits(self) -> int:
        return self.store.bits

    def dequantize(self) -> torch.Tensor:
        return self.store.dequantize()

    def small_batch_kernel(self, rows: int):
        """A callable x [rows, in] float32 -> y [rows, out] float32 (bias included) that reads the codes
        directly, for a decode step on CPU; None where no such kernel applies (then use forward)."""
        if self.store.device.type != "cpu":
            return None
        # the choice depends on the row count only through these cases; checking that a weight fits a
        # kernel scans its scales (36 ms for gpt2's int4 layers), so it is made once per case
        case = 0 if rows > SMALL_BATCH_MAX_ROWS else (1 if rows == 1 else 2)
        if case not in self._kernel_class:
            self._kernel_class[case] = _small_batch_kernel_class(self.store, rows)
        cls = self._kernel_class[case]
        if cls is None:
            return None
        if cls not in self._kernels:
            bias = None if self.bias is None else self.bias.detach().float()
            self._kernels[cls] = cls(self.store, bias)
        return self._kernels[cls]

    def _prefill_int8(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product by gpt2kit's int4 x int8 GEMM, or None where it does not apply."""
        if self.store.bits != 4 or x.dtype != torch.float32 or quant_prefill_mode() != "int8":
            return None
        kernel = self.small_batch_kernel(1)  # its packed blocks are the GEMM's input: nothing more is held
        if not isinstance(kernel, _Int4Native):
            return None
        from . import native

        y = native.int4_gemm(kernel.blocks, x, kernel.bias, self.out_features, self.in_features)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > 1 and _in_generation_prefill.get() and not x.requires_grad and x.device.type == "cpu":
            y = self._prefill_int8(x)
            if y is not None:
                return y
        kernel = None if x.requires_grad or x.device.type != "cpu" else self.small_batch_kernel(rows)
        if kernel is not None:
            return kernel(x.reshape(rows, x.shape[-1])).to(x.dtype).view(*x.shape[:-1], self.out_features)
        if (x.requires_grad or x.dtype != torch.float32 or x.device.type != "cpu"
                or self.out_features * self.in_features > _DEQUANT_BUFFER_MAX):
            return float_linear(x, self.store.dequantize().to(x.dtype), self.bias)
        # no autograd keeps the weight: dequantize into a reused buffer. A fresh one costs a page fault per
        # 4 KB each time (int8 gpt2 prefill 512: ~75 ms of dequantizing against ~15 with the buffer here)
        w = self.store.dequantize(out=_dequant_buffer(self.out_features, self.in_features))
        if _in_generation_prefill.get() and quant_prefill_mode() == "bf16":
            wb = _dequant_buffer(self.out_features, self.in_features, torch.bfloat16).copy_(w)
            y = F.linear(x.to(torch.bfloat16), wb).float()
            return y if self.bias is None else y.add_(self.bias)
        return float_linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.store.group_size}")


class QuantTiedHead(QuantLinear):
    """The output head tied to the quantized token embedding: it shares the embedding's codes.

    It exposes `.weight` (dequantized on access) because GPT2's chunked loss multiplies by it directly.
    """

    @property
    def weight(self) -> torch.Tensor:
        return self.store.dequantize()


class QuantEmbedding(nn.Module):
    """nn.Embedding whose table is quantized per row; a lookup dequantizes only the rows it reads."""

    def __init__(self, store: _QuantStore):
        super().__init__()
        self.store = store
        self.num_embeddings = store.rows
        self.embedding_dim = store.cols

    @property
    def weight(self) -> torch.Tensor:
        return self.store.dequantize()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.store.dequantize(idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.store.bits}, group_size={self.store.group_size}"


# ----- which modules, and loading a quantized checkpoint ---------------------------------------------


LINEAR_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# MoE experts (model/moe.py) are GPT-2 MLPs too: `...mlp.experts.{e}.c_fc`; the small router stays float
EXPERT_LINEAR = re.compile(r"\.mlp\.experts\.\d+\.c_(fc|proj)$")
EMBEDDINGS = ("transformer.wte", "transformer.wpe")
HEAD = "lm_head"


def quantizable_modules(model: nn.Module, embeddings: bool = True) -> list[str]:
    """Names of the modules quantization replaces: the four projections of every block and, with
    embeddings=True, the token and position embeddings (the tied head follows the token embedding)."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and (n.endswith(LINEAR_SUFFIXES) or EXPERT_LINEAR.search(n))]
    if embeddings:
        names += list(EMBEDDINGS)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_quantized(model: nn.Module, name: str, store: _QuantStore, bias: torch.Tensor | None = None) -> None:
    """Put the quantized version of module `name` (stored in `store`) into `model`, in place."""
    if name in EMBEDDINGS:
        _set_module(model, name, QuantEmbedding(store))
        if name == "transformer.wte":
            model.lm_head = QuantTiedHead(store, None)
    else:
        _set_module(model, name, QuantLinear(store, bias))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear | QuantEmbedding) for m in model.modules())
