"""How checkpoints are read: models built on the meta device without torch's Python meta kernels, and
safetensors files read tensor by tensor into memory of their own (gpt2kit.model.meta, hf.SafetensorsReader)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from gpt2kit.errors import UserError
from gpt2kit.model.hf import SafetensorsReader, read_weights
from gpt2kit.model.meta import on_meta


def test_on_meta_builds_meta_modules_without_importing_sympy():
    # a fresh interpreter: this one may have imported sympy already
    code = ("import sys, torch\n"
            "from gpt2kit.model import GPT2Network, GPT2Config\n"
            "from gpt2kit.model.meta import on_meta\n"
            "with on_meta():\n"
            "    m = GPT2Network(GPT2Config(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=16, eos_token_id=0))\n"
            "assert all(p.is_meta for p in m.parameters())\n"
            "print('sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_on_meta_leaves_real_tensors_alone():
    with on_meta():
        lin = torch.nn.Linear(4, 3)
        real = torch.nn.init.normal_(torch.zeros(1000, device="cpu"), std=1.0)  # explicit device: still drawn
    assert lin.weight.is_meta
    assert real.std() > 0.5
    torch.nn.init.normal_(torch.empty(3, device="meta"))  # outside the context, torch's own path still works


def test_reader_matches_the_file_and_owns_each_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {"a": torch.randn(64, 32, generator=g), "b": torch.arange(10, dtype=torch.int64),
            "c": torch.randint(0, 255, (33,), generator=g, dtype=torch.int32).to(torch.uint8)}
    save_file(want, str(tmp_path / "w.safetensors"))
    with SafetensorsReader(tmp_path / "w.safetensors") as r:
        assert "a" in r and "zz" not in r and len(r) == 3 and sorted(r) == ["a", "b", "c"]
        got = {n: r[n] for n in r}
        with pytest.raises(KeyError):
            r["zz"]
    for n, t in want.items():
        assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    storages = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(storages) == 3  # separate buffers: freeing one frees its memory
    got["a"].add_(1.0)  # ordinary writable memory; the file is untouched
    assert torch.equal(read_weights(tmp_path / "w.safetensors")["a"], want["a"])


def test_reader_rejects_a_corrupt_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        SafetensorsReader(bad)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_weights(bad)
