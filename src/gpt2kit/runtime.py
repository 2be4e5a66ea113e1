"""Process-wide settings that make CPU training faster, applied where they were measured to help.

Importing gpt2kit changes nothing in the process; `Trainer` (on a CPU device: `gpt2kit train`,
`finetune`, `distill`) calls `retain_freed_memory()`. Inference commands leave the allocator alone: a
1024-token prefill ran ~12% slower relative to transformers with it (in-process alternation, 4 runs),
and inference has no per-step churn of big gradients to save. Set GPT2KIT_MALLOC_TUNING=0 to leave the
allocator alone in training too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV_SWITCH = "GPT2KIT_MALLOC_TUNING"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# blocks up to this size come from the heap; larger ones (none in a GPT-2 step) are still mmap'ed
_MMAP_THRESHOLD = 2**30
_TRIM_THRESHOLD = 2**31 - 1

_state: bool | None = None  # None: not tried yet


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to serve big blocks from its heap and keep freed memory for reuse.

    Why: a training step on CPU allocates and frees hundreds of MB (the [50257, 768] gradients of the
    tied head/embedding alone are 154 MB each). By default glibc gives every block over 32 MiB a fresh
    mmap and unmaps it on free, so the kernel zero-fills those pages again on every step: ~170k minor
    page faults per `gpt2` B4xT256 step here, 5-15% of its time. Torch's CPU allocator does not cache
    (unlike its CUDA one), so this is where the reuse has to happen -- the same reason PyTorch's CPU
    tuning guides recommend jemalloc/tcmalloc. The price: glibc's heap fragments a little before freed
    blocks coalesce into reusable space, so peak RSS can grow by a few blocks (gpt2 B4xT256 step: 2.77-2.89
    GiB with, 2.71-2.74 without; docs/benchmarks.md).

    Idempotent; returns whether the settings are in effect (False off glibc, or when switched off).
    """
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # both or neither: a raised mmap threshold without a trim threshold would return memory at once
    if mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1:
        _state = True
    return _state


def malloc_tuning_state() -> bool | None:
    """True/False once retain_freed_memory() ran in this process, None before."""
    return _state
