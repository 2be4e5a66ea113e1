"""`--dtype bf16` on a CPU without bf16 instructions falls back to fp32 and says so (capability faked)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_flags, write_shards

from gpt2kit.train import precision
from gpt2kit.train.config import build_config
from gpt2kit.train.trainer import Trainer


def _fake_cpu(monkeypatch, capability: str, bf16: bool) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"avx2", "fma"} | ({"avx512_bf16"} if bf16 else set()))


def _trainer(tmp_path, messages) -> Trainer:
    flags = tiny_flags(write_shards(tmp_path / "data"), tmp_path / "run", dtype="bf16", max_steps=2)
    return Trainer(build_config(flags), log=messages.append)


def test_bf16_without_bf16_instructions_trains_in_fp32_and_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    _fake_cpu(monkeypatch, "AVX2", bf16=False)
    messages: list[str] = []
    trainer = _trainer(tmp_path, messages)
    assert trainer.cfg.run.dtype == "fp32"
    note = [m for m in messages if "--dtype bf16" in m]
    assert len(note) == 1 and "training in fp32 instead" in note[0] and "CPU capability AVX2" in note[0]
    assert 'dtype = "fp32"' in (tmp_path / "run" / "config.toml").read_text()
    with trainer.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_kept_with_native_bf16_or_when_forced(tmp_path, monkeypatch):
    _fake_cpu(monkeypatch, "AVX512", bf16=True)
    assert precision.cpu_bf16_native()[0]
    messages: list[str] = []
    assert _trainer(tmp_path / "a", messages).cfg.run.dtype == "bf16"
    assert not [m for m in messages if "--dtype bf16" in m]

    _fake_cpu(monkeypatch, "AVX512", bf16=False)  # AVX-512 without its bf16 extension
    assert not precision.cpu_bf16_native()[0]
    monkeypatch.setenv(precision.FORCE_ENV, "1")
    out: list[str] = []
    assert precision.cpu_dtype("bf16", "cpu", out.append) == "bf16"
    assert out and out[0].startswith("warning: --dtype bf16 on a CPU without native bf16")


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_capability_limited_below_avx512_is_not_native(monkeypatch, capability):
    _fake_cpu(monkeypatch, capability, bf16=True)  # e.g. ATEN_CPU_CAPABILITY=avx2 on a bf16 machine
    assert not precision.cpu_bf16_native()[0]
    assert precision.cpu_dtype("fp32", "cpu", print) == "fp32" and precision.cpu_dtype("bf16", "cuda", print) == "bf16"
