"""Peers the benchmarks compare against, loaded from where the user has them -- never copied in here.

nanoGPT is not a package: point the benchmarks at a checkout (`git clone https://github.com/karpathy/nanoGPT`)
with `--nanogpt-dir DIR` or the environment variable `NANOGPT_DIR`; its `model.py` is imported from there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NANOGPT_ENV = "NANOGPT_DIR"
NANOGPT_HINT = "git clone https://github.com/karpathy/nanoGPT and pass --nanogpt-dir DIR (or set NANOGPT_DIR)"


def nanogpt_dir(flag: str | None) -> tuple[Path | None, str | None]:
    """(the checkout, None) or (None, why nanoGPT is skipped)."""
    raw = flag or os.environ.get(NANOGPT_ENV)
    if not raw:
        return None, f"nanoGPT checkout not given: {NANOGPT_HINT}"
    path = Path(raw).expanduser().resolve()
    if not (path / "model.py").is_file():
        return None, f"no nanoGPT model.py in {path}: {NANOGPT_HINT}"
    return path, None


def load_nanogpt(directory: str | os.PathLike):
    """nanoGPT's (GPT, GPTConfig) from `directory/model.py`."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(directory) / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT, module.GPTConfig
