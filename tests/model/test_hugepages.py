"""Loaded weights placed in one huge-page-advised mapping (gpt2kit.model.hugepages)."""

from __future__ import annotations

import pytest
import torch

from gpt2kit.model import hugepages


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"big": torch.randn(4096, 4096, generator=g), "ids": torch.arange(7), "flag": torch.tensor([True, False]),
            "half": torch.randn(3, 5, generator=g).half(), "empty": torch.empty(0, 4)}


@pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here (not Linux, or THP never)")
def test_place_keeps_every_tensor_and_frees_the_inputs():
    src = _tensors()
    ref = {n: t.clone() for n, t in src.items()}
    placed = hugepages.place(src)
    assert not src  # each original handed over as it was copied
    assert list(placed) == list(ref)
    for n, t in ref.items():
        assert placed[n].dtype == t.dtype and placed[n].shape == t.shape and torch.equal(placed[n], t), n
        assert placed[n].is_contiguous() and placed[n].data_ptr() % 64 == 0
    assert placed["big"].data_ptr() % (2 << 20) == 0  # the first tensor starts on a huge page
    view = {"t": ref["big"].t(), "pad": torch.zeros(1)}  # a transposed view (a Conv1D weight on load)
    out = hugepages.place(view)
    assert out["t"].is_contiguous() and torch.equal(out["t"], ref["big"].t())
    placed["big"].add_(1.0)  # writable, ordinary CPU memory
    assert torch.equal(placed["big"], ref["big"] + 1.0)


def test_small_or_disabled_stays_as_is(monkeypatch):
    small = {"w": torch.randn(10, 10)}
    assert hugepages.place(small) is small
    monkeypatch.setenv("GPT2KIT_HUGE_PAGES", "0")
    assert not hugepages.available()
    big = {"w": torch.randn(4096, 4096)}
    assert hugepages.place(big) is big


def test_a_loaded_checkpoint_is_the_same_model(tmp_path, monkeypatch):
    from gpt2kit.model import GPT2, GPT2Config

    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)  # place even this small model
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=300, n_ctx=32, n_layer=2, n_head=2, n_embd=32, eos_token_id=0)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = GPT2.from_pretrained(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, model(idx).logits)
    monkeypatch.setenv("GPT2KIT_HUGE_PAGES", "0")
    plain = GPT2.from_pretrained(tmp_path / "m")
    for (n, a), (_, b) in zip(loaded.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
