"""Muon: orthogonalisation, its update rule by hand, its AdamW half equal to torch's, training and resume."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import assert_bitwise_equal, params_of, tiny_flags, write_shards
from train_helpers import run_training as _run

from gpt2kit.errors import UserError
from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2Network
from gpt2kit.train.muon import Muon, muon_param_groups, orthogonalize


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (3, 8, 24)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g))
    # Jordan's quintic trades exactness for speed: singular values land in about [0.7, 1.2]
    assert s.min() > 0.6 and s.max() < 1.25
    # the singular vectors are g's: U V^T of g equals the orthogonalised matrix up to that spread
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity((u @ vh).flatten(), orthogonalize(g).flatten(), dim=0)
    assert cos > 0.98


def test_muon_step_equals_the_rule_by_hand():
    torch.manual_seed(0)
    w = torch.randn(8, 32, requires_grad=True)
    w0 = w.detach().clone()
    opt = Muon([{"params": [w], "use_muon": True, "split": 1, "weight_decay": 0.1}], lr=0.01, momentum=0.9)
    buf = torch.zeros_like(w0)
    ref = w0.clone()
    for _ in range(3):
        g = torch.randn_like(w0)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g  # momentum as an EMA, then the Nesterov look-ahead
        u = orthogonalize(0.1 * g + 0.9 * buf)
        ref = ref * (1 - 0.01 * 0.1) - 0.01 * 0.2 * math.sqrt(32) * u
    torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)


def test_fused_qkv_is_orthogonalised_as_three_matrices():
    torch.manual_seed(0)
    w = torch.zeros(3 * 8, 8, requires_grad=True)
    g = torch.randn(24, 8)
    w.grad = g.clone()
    Muon([{"params": [w], "use_muon": True, "split": 3}], lr=1.0, momentum=0.0, nesterov=False).step()
    expected = -0.2 * math.sqrt(8) * torch.cat([orthogonalize(p) for p in g.chunk(3)])
    torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


def test_adamw_half_is_bitwise_torch_adamw():
    torch.manual_seed(0)
    ps = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    a = Muon([{"params": ps, "use_muon": False, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    b = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    for _ in range(5):
        for x, y in zip(ps, qs):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for x, y in zip(ps, qs):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)


def test_param_groups_put_matrices_in_muon_and_embeddings_biases_norms_in_adamw():
    model = GPT2Network(GPT2Config(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=16, eos_token_id=63))
    groups = muon_param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g["use_muon"], g.get("split", 1)): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_kind[(True, 3)] == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
    assert all(n.endswith(("c_proj.weight", "c_fc.weight")) for n in by_kind[(True, 1)])
    adam = by_kind[(False, 1)]
    assert "transformer.wte.weight" in adam and "transformer.wpe.weight" in adam  # the tied head with wte
    assert all(n.endswith(("bias", "weight")) for n in adam)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # each tensor once


def test_moe_router_takes_adamw_and_each_expert_is_orthogonalised_on_its_own():
    torch.manual_seed(0)
    model = GPT2Network(GPT2Config(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, n_embd=16, eos_token_id=63,
                                   moe_experts=3, moe_top_k=2))
    groups = muon_param_groups(model, weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adam = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert {f"transformer.h.{i}.mlp.router.weight" for i in range(2)} <= adam
    assert {f"transformer.h.1.mlp.experts.{e}.c_fc.weight" for e in range(3)} <= muon
    # one Muon step moves each expert by ITS OWN orthogonalised gradient: another expert's gradient does
    # not leak into it (a stacked [E, out, in] tensor would need the per-leading-index form to say the same)
    experts = [model.transformer.h[0].mlp.experts[e].c_fc.weight for e in range(3)]
    before = [w.detach().clone() for w in experts]
    grads = [torch.randn_like(w) * (10.0**e) for e, w in enumerate(experts)]  # very different scales
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for w, g in zip(experts, grads):
        w.grad = g.clone()
    Muon(groups, lr=1.0, momentum=0.0, nesterov=False).step()
    for w, b, g in zip(experts, before, grads):
        expected = b - 0.2 * math.sqrt(max(g.shape)) * orthogonalize(g)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def test_training_with_muon_learns_and_resumes_bitwise(shards, tmp_path):
    flags = dict(optimizer="muon", lr=1e-2, dropout=0.0, attn_dropout=0.0, warmup_steps=2)
    full = _run(tiny_flags(shards, tmp_path / "full", max_steps=12, **flags))
    train = [r["loss"] for r in full.history if "loss" in r]
    assert train[-1] < 0.8 * train[0]
    out = tmp_path / "cut"
    first = _run(tiny_flags(shards, out, max_steps=12, **flags), stop_after=6)
    assert first.step == 6
    resumed = _run({"out": str(out)}, resume=True)
    assert resumed.step == 12
    assert_bitwise_equal(params_of(out / "step-000012"), params_of(tmp_path / "full" / "step-000012"))


def test_muon_refuses_sharded_strategies():
    from gpt2kit.train.trainer import _build_muon

    model = GPT2Network(GPT2Config(vocab_size=64, n_ctx=16, n_layer=1, n_head=2, n_embd=16, eos_token_id=63))
    from gpt2kit.train.config import OptimCfg

    with pytest.raises(UserError, match="--optimizer muon"):
        _build_muon(model, OptimCfg(optimizer="muon"), "fsdp")
