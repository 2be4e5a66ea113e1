"""Shared test fixtures: the reference data in ../shared/data (skipped with a reason when absent), and a
fresh interpreter for what depends on the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared_data import SHARED_DATA, shared_path


@pytest.fixture(scope="session")
def gpt2_files_dir() -> Path:
    """Folder with OpenAI's official GPT-2 `encoder.json` + `vocab.bpe`."""
    return shared_path("gpt2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"reference data not available: {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2-core CI machines: keep torch from oversubscribing them."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


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
