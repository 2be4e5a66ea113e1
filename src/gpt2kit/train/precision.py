"""Is bf16 fast on this CPU? Without bf16 instructions a bf16 matmul runs ~60x slower than float32
(measured on an AVX2-only EPYC: ~1 vs 61-66 GFLOP/s), so `--dtype bf16` there falls back to fp32 and
says so instead of slowing training down silently."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

FORCE_ENV = "GPT2KIT_FORCE_BF16"  # =1 keeps bf16 autocast on a CPU without bf16 instructions


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_native() -> tuple[bool, str]:
    """(True, why) when the CPU kernels torch uses here have bf16 instructions (AVX-512 BF16 or AMX)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX2" also when ATEN_CPU_CAPABILITY limits it
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    hardware = bool(check and check()) or bool(amx and amx()) or bool({"avx512_bf16", "amx_bf16"} & _cpuinfo_flags())
    native = hardware and (capability.startswith("AVX512") or "AMX" in capability)
    flags = "bf16 instructions" if hardware else "no bf16 instructions (avx512_bf16 / amx_bf16)"
    return native, f"CPU capability {capability}, {flags}"


def cpu_dtype(dtype: str, device_type: str, log: Callable[[str], None]) -> str:
    """`dtype`, or "fp32" for bf16 on a CPU without native bf16 (with a message saying so)."""
    if dtype != "bf16" or device_type != "cpu":
        return dtype
    native, why = cpu_bf16_native()
    if native:
        return dtype
    if os.environ.get(FORCE_ENV) == "1":
        log(f"warning: --dtype bf16 on a CPU without native bf16 ({why}): bf16 matrix products run "
            f"far slower than fp32 here (kept because {FORCE_ENV}=1)")
        return dtype
    log(f"note: --dtype bf16 needs bf16 instructions to be fast and this CPU has none ({why}); "
        f"training in fp32 instead (bf16 would run ~60x slower here; {FORCE_ENV}=1 keeps bf16)")
    return "fp32"
