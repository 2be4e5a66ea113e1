"""gpt2kit.runtime: the allocator settings are opt-out, idempotent, and really keep big blocks mapped
(after a warm-up: the heap grows by a few blocks before freed ones coalesce into reusable space)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = r"""
import resource, sys, torch
from gpt2kit.runtime import retain_freed_memory
applied = retain_freed_memory()
assert retain_freed_memory() is applied  # idempotent
for _ in range(12):  # 40 MB blocks: above glibc's default mmap size; the heap settles after a few
    x = torch.empty(40 * 2**20 // 4).fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.empty(40 * 2**20 // 4).fill_(1.0); del x
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults)
"""


def run(env_value: str | None):
    import os

    env = dict(os.environ)
    env.pop("GPT2KIT_MALLOC_TUNING", None)
    if env_value is not None:
        env["GPT2KIT_MALLOC_TUNING"] = env_value
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_big_blocks_are_reused_instead_of_faulted_in_again():
    applied, faults = run(None)
    if not applied:
        pytest.skip("this libc has no mallopt (not glibc)")
    off_applied, off_faults = run("0")
    assert not off_applied
    # 5 x 40 MB = 51,200 fresh 4 KiB pages when each block is a new mmap; reused blocks fault ~none
    assert off_faults > 20_000
    assert faults < 2_000
