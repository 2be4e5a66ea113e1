"""Shared helpers for the model tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def run_python():
    """run_python(code, **env) -> stdout (stripped) of a fresh interpreter running `code` with extra
    environment variables: the native kernels build and load once per process, so what depends on the
    environment (GPT2KIT_NATIVE, CC, GPT2KIT_NATIVE_CFLAGS, GPT2KIT_CACHE) is tested in a new one."""

    def run(code: str, **env: str) -> str:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    return run
