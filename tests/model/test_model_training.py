"""What training relies on: the chunked loss, gradient checkpointing, GPT-2 initialisation, weight tying."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2kit import GPT2, GPT2Config
from gpt2kit.model.loss import linear_cross_entropy


def reference_loss(x, w, t):
    return F.cross_entropy(x @ w.t(), t, ignore_index=-100)


@pytest.mark.parametrize("upstream", [1.0, 3.0])  # 1.0: the backward skips scaling
@pytest.mark.parametrize("chunk_rows", [1, 5, 64, None])
def test_chunked_loss_and_grads_equal_plain_cross_entropy(chunk_rows, upstream):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(101, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 101, (37,), generator=g)
    t[::4] = -100
    ref = reference_loss(x, w, t)
    ref_gx, ref_gw = torch.autograd.grad(ref * upstream, (x, w))
    loss = linear_cross_entropy(x, w, t, chunk_rows=chunk_rows)
    gx, gw = torch.autograd.grad(loss * upstream, (x, w))
    assert abs(loss.item() - ref.item()) <= 1e-5
    assert torch.allclose(gx, ref_gx, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gw, ref_gw, atol=1e-6, rtol=1e-5)


def test_chunked_loss_without_grad_and_with_nothing_to_count():
    x, w = torch.randn(8, 4), torch.randn(10, 4)
    t = torch.randint(0, 10, (8,))
    with torch.no_grad():
        assert abs(linear_cross_entropy(x, w, t, chunk_rows=3).item() - reference_loss(x, w, t).item()) <= 1e-5
    x.requires_grad_(True)
    nothing = linear_cross_entropy(x, w, torch.full((8,), -100))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_chunked_loss_under_bf16_autocast_is_close_to_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w = (torch.randn(300, 32, generator=g) * 0.2).requires_grad_(True)
    t = torch.randint(0, 300, (64,), generator=g)
    ref = reference_loss(x, w, t)
    ref_gw = torch.autograd.grad(ref, w)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_rows=16)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.dtype == torch.float32 and gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2
    assert ((gw - ref_gw).norm() / ref_gw.norm()).item() < 2e-2


def small_model(**kw) -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(**(dict(n_layer=3, n_head=2, n_embd=32, vocab_size=97, n_ctx=32, eos_token_id=96,
                                   dropout=0.0, attn_dropout=0.0) | kw)))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = small_model()
    idx = torch.randint(0, 97, (2, 32))
    model.train()
    model(idx, targets=idx).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    model(idx, targets=idx).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-7, rtol=1e-5), n


def test_training_reduces_the_loss():
    model = small_model()
    idx = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], targets=idx[:, 1:]).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > math.log(97) - 0.3  # starts near uniform
    assert losses[-1] < 0.5 * losses[0]  # memorises a fixed batch


def test_weights_are_tied_and_initialised_as_gpt2():
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2-small-cpu", vocab_size=5000, eos_token_id=0))
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(block.mlp.c_fc.weight.std().item() - 0.02) < 1e-3
    residual_std = 0.02 / math.sqrt(2 * 6)
    assert abs(block.attn.c_proj.weight.std().item() - residual_std) < 3e-4
    assert abs(block.mlp.c_proj.weight.std().item() - residual_std) < 3e-4
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones(384)) and torch.count_nonzero(block.ln_1.bias) == 0


def test_generate_delegates_to_the_generation_module(monkeypatch):
    import gpt2kit.model.pretrained as pretrained

    monkeypatch.setattr(pretrained, "_generate", lambda model, idx, **kw: ("called", model, idx, kw))
    model = small_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    assert model.generate(idx, max_new_tokens=3) == ("called", model, idx, {"max_new_tokens": 3})


def test_linear_is_f_linear():
    import torch.nn.functional as F

    from gpt2kit.model.linear import linear

    layer = torch.nn.Linear(48, 80)
    x = torch.randn(3, 100, 48)
    assert torch.equal(linear(x, layer), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("autocast", [False, True])
def test_gelu_linear_matches_autograd_bitwise_and_saves_less(autocast):
    """gelu_linear recomputes gelu(u) in backward: same output and gradients as plain autograd, bit for
    bit (float32, and under bf16 autocast), while keeping only u -- not gelu(u) -- for backward."""
    import torch.nn.functional as F

    from gpt2kit.model.linear import gelu_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(192, 48)
    u0 = torch.randn(2, 37, 192)

    def run(fn):
        u = u0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = fn(u)
        y.float().pow(2).sum().backward()
        grads = [u.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
        layer.zero_grad(set_to_none=True)
        big = sum(t.numel() for t in saved if t.shape[-1] == 192 and t.shape != layer.weight.shape)  # activations
        return y, grads, big

    y_ref, g_ref, big_ref = run(lambda u: F.linear(F.gelu(u, approximate="tanh"), layer.weight, layer.bias))
    y, g, big = run(lambda u: gelu_linear(u, layer))
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert big == u0.numel() and big_ref >= 2 * u0.numel()  # u only, against u and gelu(u)
    with torch.no_grad():
        assert torch.equal(gelu_linear(u0, layer), F.linear(F.gelu(u0, approximate="tanh"), layer.weight, layer.bias))
