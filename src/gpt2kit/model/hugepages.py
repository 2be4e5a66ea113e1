"""Loaded weights in transparent huge pages (Linux), so that streaming them is not cut every 4 KB.

Why: a batch-1 decode step reads every weight once, at the speed the memory system streams them. A CPU's
hardware prefetchers stop at 4 KB page boundaries and each page costs a TLB entry; in 2 MB pages the
stream runs on. Measured on a 2-core Zen 5 EPYC VM (THP "madvise"), gpt2's whole float32 decode step
in gpt2kit's native step, same process, interleaved: 7.33 ms in 4 KB pages, 6.90 ms in huge pages (6%);
int4, 2% (docs/benchmarks.md).

How: the tensors are copied, one at a time, into one private anonymous mapping advised MADV_HUGEPAGE
(the copy is what faults its pages in, so they come as huge pages where the kernel has them), each
original dropped as its copy is made: loading needs the weights plus one tensor, as before. Elsewhere
(not Linux, THP "never", under 64 MB of weights, GPT2KIT_HUGE_PAGES=0) the tensors stay as they are.
"""

from __future__ import annotations

import mmap
import os
import sys

import torch

_HUGE = 2 << 20  # x86-64 and arm64 (4 KB granule) transparent huge page size
_ALIGN = 64
MIN_BYTES = 64 << 20  # below this a model's weights fit in caches and TLBs well enough


def available() -> bool:
    """Whether weights can be placed in huge pages here (Linux, THP not "never", not disabled)."""
    if os.environ.get("GPT2KIT_HUGE_PAGES", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def place(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors (names, dtypes, shapes, values), contiguous (whatever their layout was), in one
    huge-page-advised mapping; `tensors` is emptied as they move. Returns `tensors` unchanged where huge
    pages do not apply."""
    sizes = {n: _padded(t) for n, t in tensors.items()}
    total = sum(sizes.values())
    if total < MIN_BYTES or not available() or not all(t.device.type == "cpu" for t in tensors.values()):
        return tensors
    try:
        # private and anonymous: shared (shmem) mappings follow another THP switch, usually off
        region = mmap.mmap(-1, total + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return tensors
    arena = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as a view lives
    offset = -arena.data_ptr() % _HUGE  # start on a huge-page boundary
    placed: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        t = tensors.pop(name)
        nbytes = t.numel() * t.element_size()
        view = arena[offset : offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        placed[name] = view
        offset += sizes[name]
        del t  # the original is freed here unless the caller still holds it
    return placed


def _padded(t: torch.Tensor) -> int:
    return (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN


def huge_page_bytes() -> int:
    """This process's anonymous memory in huge pages (AnonHugePages), for tests and reports; -1 if unknown."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return -1
