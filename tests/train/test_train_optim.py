"""Schedules equal their formulas at chosen steps; AdamW parameter groups are GPT-2's."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2kit.train.optim import build_optimizer, constant_lr, cosine_lr, inverse_sqrt_lr, lr_at, param_groups


def test_inverse_sqrt_equals_the_seed_formula():
    # eta_t = eta0 * min(t^-0.5, t * w^-1.5), eta0 = peak * sqrt(w); t = step + 1
    peak, w = 1e-3, 100
    eta0 = peak * math.sqrt(w)
    for step in (0, 9, 49, 98, 99, 100, 399, 9999):
        t = step + 1
        assert inverse_sqrt_lr(step, peak, w) == pytest.approx(eta0 * min(t**-0.5, t * w**-1.5), rel=1e-12)
    assert inverse_sqrt_lr(0, peak, w) == pytest.approx(peak / 100)  # linear warm-up from peak/w
    assert inverse_sqrt_lr(99, peak, w) == pytest.approx(peak)  # the peak at t = w
    assert inverse_sqrt_lr(399, peak, w) == pytest.approx(peak / 2)  # then peak * sqrt(w/t)


def test_cosine_warmup_then_half_cosine_to_floor():
    peak, w, n, floor = 6e-4, 10, 110, 6e-5
    assert cosine_lr(0, peak, w, n, floor) == pytest.approx(peak * 1 / 10)
    assert cosine_lr(4, peak, w, n, floor) == pytest.approx(peak * 5 / 10)
    assert cosine_lr(9, peak, w, n, floor) == pytest.approx(peak)
    # halfway through the decay: floor + (peak - floor) / 2
    assert cosine_lr(59, peak, w, n, floor) == pytest.approx(floor + 0.5 * (peak - floor))
    t = 35  # step 34: progress 25/100
    assert cosine_lr(t - 1, peak, w, n, floor) == pytest.approx(
        floor + 0.5 * (1 + math.cos(math.pi * 0.25)) * (peak - floor)
    )
    assert cosine_lr(109, peak, w, n, floor) == pytest.approx(floor)
    assert cosine_lr(500, peak, w, n, floor) == pytest.approx(floor)  # stays at the floor past the end


def test_constant_and_dispatch():
    assert constant_lr(0, 1e-3, 4) == pytest.approx(2.5e-4)
    assert constant_lr(3, 1e-3, 4) == pytest.approx(1e-3)
    assert constant_lr(1000, 1e-3, 4) == pytest.approx(1e-3)
    assert constant_lr(0, 1e-3, 0) == 1e-3
    assert lr_at(7, "cosine", 1e-3, 2, 20, 0.0) == cosine_lr(7, 1e-3, 2, 20, 0.0)
    assert lr_at(7, "inverse_sqrt", 1e-3, 2, 20, 0.0) == inverse_sqrt_lr(7, 1e-3, 2)


def test_param_groups_decay_only_linear_matrices():
    from gpt2kit.model import GPT2, GPT2Config

    model = GPT2(GPT2Config.from_preset("gpt2-tiny", vocab_size=96, n_ctx=32, eos_token_id=0))
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # the tied head appears once, as wte
    decayed = sorted(names[id(p)] for p in decay["params"])
    kept = sorted(names[id(p)] for p in no_decay["params"])
    expected = sorted(
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    assert decayed == expected
    assert "transformer.wte.weight" in kept and "transformer.wpe.weight" in kept
    assert all(n.endswith(".bias") or ".ln_" in n or n.endswith(("wte.weight", "wpe.weight")) for n in kept)
    # every trainable tensor exactly once (the tied lm_head is wte)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_optimizer_is_fused_adamw_with_bias_correction():
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2-tiny", vocab_size=96, n_ctx=32, eos_token_id=0))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] is True
    # one step of bias-corrected Adam moves every parameter with a non-zero gradient by ~lr
    p = model.transformer.h[0].mlp.c_fc.bias
    before = p.detach().clone()
    for q in model.parameters():
        q.grad = torch.full_like(q, 0.5)
    opt.step()
    assert torch.allclose(before - p.detach(), torch.full_like(p, 1e-2), atol=1e-6)
