"""Tiny checkpoints for the export tests, and where to find llama.cpp's Python bindings."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import pytest
import torch

TEXT = ("the cat sat on the mat. the dog sat on the log. a bird flew over the sea, and the ship "
        "sailed to the island at dawn. Ünïcödé wörds, numbers 12345 and   spaces!\n") * 10


def learned_tokenizer(directory: Path):
    from gpt2kit.tokenizer import Tokenizer

    Tokenizer.train([TEXT], 400, progress=False).save(directory)
    return Tokenizer.from_pretrained(directory)


def checkpoint(directory: Path, tokenizer, n_embd: int = 64, seed: int = 0, spread: float = 1.0) -> Path:
    """A random plain GPT-2 (its matrices scaled by `spread`). At GPT-2's own init scale the logits of this
    seed are a few 1e-3 apart at the top or more, so greedy tokens are decided by the model, not by rounding; larger
    activations would meet llama.cpp's GELU, which rounds its input to fp16 (error ~1e-3 at spread 4)."""
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, n_ctx=128, n_layer=2,
                     n_head=2, n_embd=n_embd, dropout=0.0, attn_dropout=0.0)
    model = GPT2(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(spread)
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


def llama_cpp_module():
    """The `llama_cpp` bindings: an installed llama-cpp-python, or the source package the lead's build
    script unpacks (its Python files + the libraries in vendor/llama.cpp/build/bin). Skips when absent."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    candidates = []
    if os.environ.get("GPT2KIT_LLAMA_CPP"):
        given = Path(os.environ["GPT2KIT_LLAMA_CPP"])
        candidates += [given, given / "build" / "bin"]
    candidates += [Path(p) for p in glob.glob(os.path.expanduser("~/.cache/llama.cpp/*/vendor/llama.cpp/build/bin"))]
    for bin_dir in candidates:
        if not (bin_dir / "libllama.so").exists() and not (bin_dir / "libllama.dylib").exists():
            continue
        package_root = bin_dir.parents[3] if len(bin_dir.parents) > 3 else None
        if package_root is None or not (package_root / "llama_cpp" / "llama.py").exists():
            continue
        os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
        sys.path.insert(0, str(package_root))
        try:
            import llama_cpp

            return llama_cpp
        except ImportError as e:
            pytest.skip(f"llama.cpp bindings in {package_root} need a module that is missing: {e}")
    pytest.skip("llama.cpp not found: install llama-cpp-python, or set GPT2KIT_LLAMA_CPP to a llama.cpp build "
                "with build/bin/libllama.so beside llama-cpp-python's source (see docs/interop.md)")
