"""gpt2kit's own CPU kernels in C, compiled at first use for the CPU at hand and loaded with ctypes.

Why C and why at first use: a decode step streams every weight once, so its products must read at memory
speed, which needs software prefetch and SIMD dot products chosen for this CPU: the batch-1 int4
matrix-vector product (gemv.c: AVX-VNNI, AVX-512 VNNI, AVX2, or portable C) and the float32 product for a
few rows (gemm_f32.c: AVX-512F, AVX2 + FMA, or portable C), which BLAS libraries run at a fraction of that
speed; `-march=native` picks the paths. attention.c is a batched decode step's attention over the KV
cache in one call, where numpy makes one BLAS call per row and head. The shared library lands in a cache directory keyed by the source, the
compiler flags and the CPU's feature flags, written atomically, so later processes load it in
milliseconds and a different CPU gets its own build. Without a C compiler, or with GPT2KIT_NATIVE=0, it
is simply unavailable and callers use torch's kernels instead (`status()` says why).

Environment: GPT2KIT_NATIVE=0 disables it; CC names the compiler (default cc, then gcc);
GPT2KIT_CACHE (default ~/.cache/gpt2kit) holds the builds under native/; GPT2KIT_NATIVE_CFLAGS adds
compiler flags (the tests build the AVX2 and portable paths with `-mno-avxvnni -mno-avx512vnni` and
`-mno-avx2` on a CPU that has more).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

_SOURCES = [Path(__file__).with_name(name)
            for name in ("gemv.c", "gemv_int8.c", "gemm_f32.c", "gemm_int4.c", "attention.c", "decode_step.c")]
_HEADERS = [Path(__file__).with_name("kernels.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": CDLL | None, "why": str

BLOCK = 32  # weights per block; a block is 20 bytes: fp16 scale, fp16 scale * zero, 16 bytes of codes
BLOCK_BYTES = 20
_FP16_MIN_NORMAL, _FP16_MAX = 6.11e-5, 6.0e4


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _arch_flags() -> list[str]:
    extra = os.environ.get("GPT2KIT_NATIVE_CFLAGS", "").split()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        return ["-march=native", *extra]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native", *extra]
    return extra


# part of the build's cache key, as the compiler and -march flags are
_BASE_FLAGS = ["-O3", "-std=c11"]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cc: str, out: Path) -> str:
    """Compile the kernel to `out` (atomically); '' on success, else why not."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base = [cc, *_BASE_FLAGS, "-shared", "-fPIC", *_arch_flags(), *map(str, _SOURCES)]
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        why = ""
        for extra in (["-fopenmp"], []):  # without OpenMP the kernel runs on one thread
            try:
                r = subprocess.run([*base, *extra, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"{cc} failed: {e}"
            if r.returncode == 0:
                os.replace(tmp, out)
                return ""
            why = (r.stderr.strip().splitlines() or ["no message"])[-1]
        return f"{cc} could not compile {' '.join(p.name for p in _SOURCES)}: {why}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("GPT2KIT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by GPT2KIT_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc or gcc, or $CC) on PATH"
    key = hashlib.sha256()
    for part in (*(p.read_bytes() for p in _SOURCES + _HEADERS), cc.encode(), " ".join(_BASE_FLAGS + _arch_flags()).encode(), _cpu_flags().encode(),
                 platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    cache = Path(os.environ.get("GPT2KIT_CACHE") or Path.home() / ".cache" / "gpt2kit") / "native"
    lib_path = cache / f"gemv-{key.hexdigest()[:16]}.so"
    if not lib_path.is_file():
        why = _build(cc, lib_path)
        if why:
            return None, why
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        return None, f"could not load {lib_path}: {e}"
    for fn in (lib.gpt2kit_int4_gemv,):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.gpt2kit_int4_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    lib.gpt2kit_int4_dequantize.restype = None
    lib.gpt2kit_int4_isa.restype = ctypes.c_char_p
    lib.gpt2kit_f32_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.gpt2kit_f32_gemm.restype = None
    lib.gpt2kit_f32_isa.restype = ctypes.c_char_p
    lib.gpt2kit_decode_attention.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
                                             ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_float,
                                             ctypes.c_void_p, ctypes.c_int]
    lib.gpt2kit_decode_attention.restype = ctypes.c_int
    lib.gpt2kit_int8_gemv.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 3
    lib.gpt2kit_int8_gemv.restype = ctypes.c_int
    lib.gpt2kit_int8_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4
    lib.gpt2kit_int8_dequantize.restype = None
    lib.gpt2kit_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_int]
    lib.gpt2kit_decode_step.restype = ctypes.c_int
    lib.gpt2kit_int4_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.gpt2kit_int4_gemm.restype = ctypes.c_int
    lib.gpt2kit_int4_gemm_available.restype = ctypes.c_int
    lib.gpt2kit_gelu.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
    lib.gpt2kit_gelu.restype = None
    lib.gpt2kit_decode_rows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.gpt2kit_decode_rows.restype = ctypes.c_int
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None where they cannot be (see status())."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
        return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """What the native int4 kernel runs with ("avx2+avx-vnni", ...), or why the kernels are unavailable."""
    lib = library()
    return lib.gpt2kit_int4_isa().decode() if lib is not None else f"unavailable: {_state['why']}"


def f32_status() -> str:
    """What the native float32 product runs with ("avx512f", "avx2+fma", "portable"), or why it is unavailable."""
    lib = library()
    return lib.gpt2kit_f32_isa().decode() if lib is not None else f"unavailable: {_state['why']}"


def fits_int4_blocks(scales: torch.Tensor, group_size: int) -> bool:
    """Whether a weight's int4 groups map onto 32-blocks with fp16 scales without losing precision."""
    if group_size % BLOCK:
        return False
    a = scales.abs()
    nonzero = a[a > 0]
    # scale * zero (zero <= 15) is stored in fp16 too; a scale below fp16's normal range would lose bits
    return bool((a * 16 <= _FP16_MAX).all()) and (nonzero.numel() == 0 or bool((nonzero >= _FP16_MIN_NORMAL).all()))


_PACK_ROWS = 4096


def _pack_rows(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int, out: np.ndarray) -> None:
    rows = packed.shape[0]
    codes = np.empty((rows, packed.shape[1] * 2), np.uint8)
    codes[:, 0::2], codes[:, 1::2] = packed & 0x0F, packed >> 4
    codes = codes.reshape(rows, -1, BLOCK)  # [rows, blocks, 32]
    nb = codes.shape[1]
    per = group_size // BLOCK
    s = np.repeat(scales.astype(np.float32), per, axis=1)  # [rows, blocks]
    z = np.repeat(zeros.astype(np.float32), per, axis=1)
    out[:, : 2 * nb] = s.astype("<f2").view(np.uint8)
    out[:, 2 * nb : 4 * nb] = (s * z).astype("<f2").view(np.uint8)
    out[:, 4 * nb :] = (codes[..., :16] | (codes[..., 16:] << 4)).reshape(rows, nb * 16)


def pack_int4_blocks(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """gpt2kit's int4 storage (codes two per byte, even index low; float32 scales and uint8 zeros per
    group) -> the rows gemv.c reads, as a uint8 tensor [rows, cols / 32 * 20]: per row the blocks'
    fp16 scales, then their fp16 scale * zero, then their codes (byte j: code j low, code j + 16 high)."""
    rows, half = qweight.shape
    nb = half * 2 // BLOCK
    out = np.empty((rows, nb * BLOCK_BYTES), np.uint8)
    # a few thousand rows at a time: the unpacked codes of a whole output head (gpt2: 38.6 MB) would
    # otherwise raise a load's peak memory for nothing
    for r0 in range(0, rows, _PACK_ROWS):
        r1 = min(rows, r0 + _PACK_ROWS)
        _pack_rows(qweight[r0:r1].numpy(), scales[r0:r1].numpy(), zeros[r0:r1].numpy(), group_size, out[r0:r1])
    return torch.from_numpy(out)


def int4_gemv(blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, rows: int, cols: int,
              threads: int | None = None) -> torch.Tensor:
    """y [1, rows] = W~ x for one float32 row x [1, cols] and W~ packed by pack_int4_blocks."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native int4 kernel {status()}")
    x = x.reshape(cols).float().contiguous()
    y = torch.empty(1, rows)
    rc = lib.gpt2kit_int4_gemv(blocks.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
                               y.data_ptr(), rows, cols, threads or torch.get_num_threads())
    if rc:
        raise MemoryError("native int4 kernel: out of memory for the activation row")
    return y


def int4_gemm_available() -> bool:
    """Whether int4_gemm was built here (it needs AVX2, FMA and F16C)."""
    lib = library()
    return lib is not None and bool(lib.gpt2kit_int4_gemm_available())


def int4_gemm(blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, rows: int, cols: int,
              threads: int | None = None) -> torch.Tensor:
    """y [M, rows] = x W~^T + bias for many float32 rows x [M, cols] and W~ packed by pack_int4_blocks,
    multiplied in 8 bits (x quantized per block of 32, as int4_gemv does for one row): gemm_int4.c."""
    if not int4_gemm_available():
        raise RuntimeError(f"native int4 GEMM unavailable here ({status()})")
    M = x.numel() // cols
    x = x.reshape(M, cols).float().contiguous()
    y = torch.empty(M, rows)
    rc = library().gpt2kit_int4_gemm(blocks.data_ptr(), rows, cols, x.data_ptr(), M,
                                     None if bias is None else bias.data_ptr(), y.data_ptr(),
                                     threads or torch.get_num_threads())
    if rc:
        raise MemoryError("native int4 GEMM: out of memory for the quantized activations")
    return y


def int8_gemv(codes_s8: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor,
              bias: torch.Tensor | None, threads: int | None = None) -> torch.Tensor:
    """y [1, rows] = W~ x for one float32 row x [1, cols] and an int8 weight per output row: signed codes
    [rows, cols] (code - 128), float32 scales [rows] and uint8 zeros [rows] (W~ = (code - zero) * scale);
    cols a multiple of 32. The row is quantized per block of 32 to int8 (gemv_int8.c)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels {status()}")
    rows, cols = codes_s8.shape
    if cols % BLOCK or scales.shape != (rows,) or zeros.shape != (rows,):
        raise ValueError(f"int8_gemv: codes {list(codes_s8.shape)}, scales {list(scales.shape)} do not fit")
    x = x.reshape(cols).float().contiguous()
    y = torch.empty(1, rows)
    rc = lib.gpt2kit_int8_gemv(codes_s8.data_ptr(), scales.data_ptr(), zeros.data_ptr(), x.data_ptr(),
                               None if bias is None else bias.data_ptr(), y.data_ptr(), rows, cols,
                               threads or torch.get_num_threads())
    if rc:
        raise MemoryError("native int8 kernel: out of memory for the activation row")
    return y


def _output(out: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    if out is None:
        return torch.empty(rows, cols)
    if out.shape != (rows, cols) or out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"dequantize: out must be a contiguous CPU float32 [{rows}, {cols}], got {out.dtype} {list(out.shape)}")
    return out


def int8_dequantize(codes_s8: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zeros) * scales [rows, cols] float32 from gpt2kit's in-memory int8 storage (signed codes =
    code - 128), in one pass (bitwise equal to gpt2kit.model.quantized.dequantize)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels {status()}")
    rows, cols = codes_s8.shape
    if scales.shape[0] != rows or cols % scales.shape[1] or zeros.shape != scales.shape:
        raise ValueError(f"int8 codes {list(codes_s8.shape)} and scales {list(scales.shape)} do not fit")
    q, s, z = codes_s8.contiguous(), scales.float().contiguous(), zeros.contiguous()
    out = _output(out, rows, cols)
    lib.gpt2kit_int8_dequantize(q.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), rows, cols,
                                cols // scales.shape[1], threads or torch.get_num_threads())
    return out


def int4_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, cols: int,
                    threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zeros) * scales [rows, cols] float32 from gpt2kit's int4 storage, in one pass (bitwise
    equal to gpt2kit.model.quantized.dequantize)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels {status()}")
    rows = qweight.shape[0]
    group = cols // scales.shape[1]
    if group % 2 or qweight.shape[1] * 2 != cols:
        raise ValueError(f"int4 codes [{rows}, {qweight.shape[1]}] with group {group} do not fit {cols} columns")
    q, s, z = qweight.contiguous(), scales.float().contiguous(), zeros.contiguous()
    out = _output(out, rows, cols)
    lib.gpt2kit_int4_dequantize(q.data_ptr(), s.data_ptr(), z.data_ptr(), out.data_ptr(), rows, cols, group,
                                threads or torch.get_num_threads())
    return out


def gelu(x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """GPT-2's tanh GELU of a contiguous float32 CPU tensor into a new one, by the decode step's own
    function (within a few ulp of torch's)."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels {status()}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"native gelu needs a contiguous float32 CPU tensor, got {x.dtype} on {x.device}")
    y = torch.empty_like(x)
    lib.gpt2kit_gelu(x.data_ptr(), y.data_ptr(), x.numel(), threads or torch.get_num_threads())
    return y


def f32_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray,
               threads: int | None = None) -> np.ndarray:
    """out [M, N] = x [M, K] weight.T + bias for float32 C-contiguous numpy arrays, weight [N, K] as nn.Linear
    holds it (no copy, no packing). Meant for a few rows (decode steps of a batch): each output is summed
    in an order that does not depend on M, so a row's result is bitwise the same alone or in a batch."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels {status()}")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape != (N, K) or out.shape != (M, N) or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"f32_linear: x {x.shape}, weight {weight.shape}, out {out.shape} do not fit")
    for a in (x, weight, out) + (() if bias is None else (bias,)):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError("f32_linear: arrays must be C-contiguous float32")
    lib.gpt2kit_f32_gemm(x.ctypes.data, M, K, weight.ctypes.data, None if bias is None else bias.ctypes.data,
                         out.ctypes.data, N, N, K, threads or torch.get_num_threads())
    return out


def decode_attention(qkv: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, keep: np.ndarray | None,
                     scale: float, out: np.ndarray, threads: int | None = None) -> np.ndarray:
    """One decode step's attention for B rows: qkv [B, 3C] (the queries are its first C columns), keys and
    values [B, H, max_len, D] cache views (their first `length` positions are read), keep [B, length] bool
    (False: a masked column) or None; writes softmax(q K^T * scale) V as out [B, C]."""
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels {status()}")
    B, H, max_len, D = keys.shape
    if (values.shape != keys.shape or values.strides != keys.strides or qkv.shape != (B, 3 * H * D)
            or out.shape != (B, H * D) or not 1 <= length <= max_len
            or (keep is not None and keep.shape != (B, length))):
        raise ValueError(f"decode_attention: qkv {qkv.shape}, cache {keys.shape}, out {out.shape}, "
                         f"length {length} do not fit")
    for a in (qkv, keys, values, out):
        if a.dtype != np.float32:
            raise ValueError("decode_attention: float32 arrays only")
    if not (qkv.flags.c_contiguous and out.flags.c_contiguous and keys.strides[3] == 4):
        raise ValueError("decode_attention: qkv and out must be C-contiguous, the cache's last axis contiguous")
    if keep is not None:
        keep = np.ascontiguousarray(keep, dtype=np.bool_)
    sb, sh, st = (s // 4 for s in keys.strides[:3])
    rc = lib.gpt2kit_decode_attention(qkv.ctypes.data, 3 * H * D, B, H, D, keys.ctypes.data, values.ctypes.data,
                                      sb, sh, st, length, None if keep is None else keep.ctypes.data, scale,
                                      out.ctypes.data, threads or torch.get_num_threads())
    if rc:
        raise MemoryError("decode_attention: out of memory for the scores")
    return out
