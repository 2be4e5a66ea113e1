"""Parity with transformers' GPT2LMHeadModel: same weights give the same logits, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from gpt2kit import GPT2, GPT2Config
from gpt2kit.model.hf import _is_conv1d, from_hf_state_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")


def small_config(**kw) -> GPT2Config:
    base = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=503, n_ctx=128, eos_token_id=502,
                dropout=0.0, attn_dropout=0.0)
    return GPT2Config(**(base | kw))


def hf_model(config: GPT2Config, seed: int = 0):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**config.to_hf_dict())
    return transformers.GPT2LMHeadModel(hf_config).eval()


def ours_from_hf(hf, config: GPT2Config) -> GPT2:
    model = GPT2(config)
    missing, unexpected = model.load_state_dict(from_hf_state_dict(hf.state_dict(), config), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # the tied head is the embedding
    return model.eval()


def hf_from_ours(model: GPT2):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**model.config.to_hf_dict()))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf.eval()


@pytest.mark.parametrize("batch, length", [(1, 1), (2, 7), (3, 64), (2, 128)])
def test_logits_match_hf_to_ours(batch, length):
    config = small_config()
    hf = hf_model(config)
    ours = ours_from_hf(hf, config)
    idx = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ours_logits, hf_logits = ours(idx).logits, hf(idx).logits
    assert ours_logits.shape == (batch, length, config.vocab_size)
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-5
    with torch.no_grad():  # last_only is the last row of the full logits
        last = ours(idx, last_only=True).logits
    assert last.shape == (batch, 1, config.vocab_size)
    assert (last - hf_logits[:, -1:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_ours_to_hf(attn_implementation):
    config = small_config()
    torch.manual_seed(1)
    ours = GPT2(config).eval()
    hf = hf_from_ours(ours)
    hf.config._attn_implementation = attn_implementation
    idx = torch.randint(0, config.vocab_size, (4, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx).logits - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5


def test_full_context_on_a_narrow_model():
    """n_ctx = 1024 positions, every one used, batch 2 (narrow width keeps it fast)."""
    config = small_config(n_layer=2, n_head=2, n_embd=32, n_ctx=1024)
    hf = hf_model(config, seed=3)
    ours = ours_from_hf(hf, config)
    idx = torch.randint(0, config.vocab_size, (2, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx).logits - hf(idx).logits).abs().max().item()
    assert diff <= 1e-5


def shifted_targets(idx: torch.Tensor) -> torch.Tensor:
    """Our targets for HF's `labels=idx` (HF shifts inside; the last position has no target)."""
    return torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_loss_and_gradients_match_hf(chunk_rows, monkeypatch):
    import gpt2kit.model.loss as loss_module

    if chunk_rows:  # several chunks, one of them partial
        monkeypatch.setitem(loss_module._CHUNK_ELEMENTS, "cpu", chunk_rows * 503)
    config = small_config()
    hf = hf_model(config, seed=2)
    ours = ours_from_hf(hf, config)
    idx = torch.randint(0, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))

    hf_loss = hf(idx, labels=idx).loss
    hf_loss.backward()
    out = ours(idx, targets=shifted_targets(idx))
    out.loss.backward()
    assert out.logits is None  # the loss path never builds the [B, T, V] logits
    assert abs(out.loss.item() - hf_loss.item()) <= 1e-5

    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if name == "lm_head.weight":
            continue  # the same tensor as transformer.wte.weight
        g_hf = hf_grads[name].grad
        if _is_conv1d(name):  # HF keeps these as Conv1D (in x out)
            g_hf = g_hf.t()
        assert relative_error(p.grad, g_hf) <= 1e-5, name


def test_masked_loss_matches_hf_labels():
    config = small_config()
    hf = hf_model(config, seed=4)
    ours = ours_from_hf(hf, config)
    idx = torch.randint(0, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4))
    labels = idx.clone()
    labels[0, :10] = -100  # e.g. a prompt that is not trained on
    labels[1, 20:] = -100
    targets = shifted_targets(labels)
    loss_mask = targets != -100
    with torch.no_grad():
        hf_loss = hf(idx, labels=labels).loss
        via_mask = ours(idx, targets=shifted_targets(idx), loss_mask=loss_mask).loss
        via_ignore = ours(idx, targets=targets).loss
        with_logits = ours(idx, targets=targets, return_logits=True)
    assert abs(via_mask.item() - hf_loss.item()) <= 1e-5
    assert abs(via_ignore.item() - hf_loss.item()) <= 1e-5
    assert abs(with_logits.loss.item() - hf_loss.item()) <= 1e-5
    assert with_logits.logits.shape == (2, 30, config.vocab_size)


def test_training_mode_dropout_is_active_and_eval_is_deterministic():
    config = small_config(dropout=0.1, attn_dropout=0.1)
    model = GPT2(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)
    model.eval()
    assert torch.equal(model(idx).logits, model(idx).logits)
