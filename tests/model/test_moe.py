"""Mixture-of-Experts feed-forward: exactness against dense, routing, capacity, the aux losses, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2kit.errors import UserError
from gpt2kit.model.config import ConfigError, GPT2Config
from gpt2kit.model.gpt2 import GPT2Network
from gpt2kit.model.moe import MoEMLP, load_balancing_loss, read_moe_metrics, route, z_loss


def cfg(**kw) -> GPT2Config:
    base = dict(vocab_size=96, n_ctx=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, attn_dropout=0.0,
                eos_token_id=0)
    return GPT2Config(**(base | kw))


def test_one_expert_top1_unbounded_equals_dense_with_the_same_weights():
    torch.manual_seed(0)
    dense = GPT2Network(cfg()).eval()
    moe = GPT2Network(cfg(moe_experts=1, moe_top_k=1, moe_dropless=True)).eval()
    state = {n.replace(".mlp.", ".mlp.experts.0."): t for n, t in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert unexpected == [] and all(n.endswith("mlp.router.weight") for n in missing)
    idx = torch.randint(0, 96, (3, 20))
    a, b = dense(idx).logits, moe(idx).logits
    assert (a - b).abs().max().item() < 1e-6
    ta, tb = dense(idx, targets=idx), moe(idx, targets=idx)
    assert abs(ta.loss.item() - tb.loss.item()) < 1e-6
    # one expert: P = 1 and f = 1, so each layer's balance term is alpha * 1 * 1 and its z-loss log(1)^2 = 0
    assert tb.aux_loss.item() == pytest.approx(2 * 0.01, abs=1e-6)


def test_aux_losses_match_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5]])
    plan, probs = route(logits, top_k=1, cap=10)
    assert plan.routed.tolist() == [1, 2, 1]  # argmax: 0, 1, 1, 2
    # f = [1/4, 2/4, 1/4]; P = column means of the softmax over all 4 tokens
    sm = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    P = [sum(r[i] for r in sm) / 4 for i in range(3)]
    want = 3 * (0.25 * P[0] + 0.5 * P[1] + 0.25 * P[2])
    assert load_balancing_loss(probs, plan.routed).item() == pytest.approx(want, rel=1e-6)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert z_loss(logits).item() == pytest.approx(sum(v * v for v in lse) / 4, rel=1e-6)
    # top-2: f counts both assignments of every token (8 in all)
    plan2, _ = route(logits, top_k=2, cap=10)
    assert plan2.routed.sum().item() == 8


def test_aux_loss_gradient_reaches_the_router_weights():
    torch.manual_seed(0)
    layer = MoEMLP(cfg(moe_experts=4, moe_top_k=2), lambda: torch.nn.Linear(32, 32))
    x = torch.randn(2, 8, 32)
    layer(x)
    (aux,) = layer.aux_losses
    aux.backward()
    g = layer.router.weight.grad
    assert g is not None and g.abs().sum().item() > 0
    # and the balance term alone moves with the router weights too (through P), not only the z-loss
    layer.router.weight.grad = None
    logits = layer.router_logits(x.reshape(-1, 32))
    plan, probs = route(logits, 2, 100)
    load_balancing_loss(probs, plan.routed).backward()
    assert layer.router.weight.grad.abs().sum().item() > 0


def _reference(layer: MoEMLP, x: torch.Tensor, cap: int) -> tuple[torch.Tensor, int]:
    """Token by token, in the same priority order (first choices before second choices, then token order)."""
    xf = x.reshape(-1, x.shape[-1])
    probs = layer.router_logits(xf).softmax(-1)
    top_p, top_i = probs.topk(layer.top_k, -1)
    gates = top_p if layer.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(xf)
    used = [0] * layer.num_experts
    dropped = 0
    for j in range(layer.top_k):
        for n in range(xf.shape[0]):
            e = int(top_i[n, j])
            if used[e] >= cap:
                dropped += 1
                continue
            used[e] += 1
            out[n] += gates[n, j] * layer.experts[e](xf[n : n + 1])[0]
    return out.view_as(x), dropped


@pytest.mark.parametrize("top_k,factor", [(1, 1.0), (2, 0.5), (2, 1.25)])
def test_dispatch_matches_a_token_by_token_reference_with_capacity(top_k, factor):
    torch.manual_seed(1)
    c = cfg(moe_experts=4, moe_top_k=top_k, moe_capacity_factor=factor)
    layer = MoEMLP(c, lambda: torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)))
    torch.nn.init.normal_(layer.router.weight, std=1.0)  # a skewed routing so that capacity bites
    x = torch.randn(2, 12, 32)
    cap = math.ceil(factor * 24 * top_k / 4)
    want, dropped = _reference(layer, x, cap)
    got = layer(x)
    assert (got - want).abs().max().item() < 1e-5
    stats = read_moe_metrics(layer)
    assert stats["moe_dropped"] == pytest.approx(dropped / (24 * top_k))
    if factor < 1:
        assert dropped > 0
        # a token none of whose choices fit gets exactly 0: it passes through the residual
        assert (got.reshape(-1, 32).abs().sum(-1) == 0).any()


def test_eval_uses_the_eval_capacity_factor_and_dropless_drops_nothing():
    c = cfg(moe_experts=4, moe_capacity_factor=0.5, moe_eval_capacity_factor=2.0)
    layer = MoEMLP(c, lambda: torch.nn.Identity())
    assert layer.capacity(64) == 8
    layer.eval()
    assert layer.capacity(64) == 32
    dropless = MoEMLP(cfg(moe_experts=4, moe_dropless=True), lambda: torch.nn.Identity())
    torch.nn.init.normal_(dropless.router.weight, std=5.0)
    dropless(torch.randn(1, 40, 32))
    assert read_moe_metrics(dropless)["moe_dropped"] == 0


def test_router_is_float32_under_bf16_autocast_and_starts_small():
    torch.manual_seed(0)
    model = GPT2Network(cfg(moe_experts=4, n_layer=2, moe_every=2))
    # moe_every=2: block 1 is MoE, block 0 dense
    assert not isinstance(model.transformer.h[0].mlp, MoEMLP) and isinstance(model.transformer.h[1].mlp, MoEMLP)
    layer = model.transformer.h[1].mlp
    assert layer.router.weight.std().item() == pytest.approx(0.002, rel=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(torch.randn(5, 32, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32


def test_training_metrics_report_per_expert_load():
    torch.manual_seed(0)
    model = GPT2Network(cfg(moe_experts=4, moe_top_k=2)).train()
    idx = torch.randint(0, 96, (2, 16))
    out = model(idx, targets=idx)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    m = read_moe_metrics(model)
    assert len(m["moe_load"]) == 2 and all(len(load) == 4 and abs(sum(load) - 1) < 1e-4 for load in m["moe_load"])
    assert 1.0 <= m["moe_busiest_over_mean"] <= 4.0
    assert read_moe_metrics(GPT2Network(cfg())) == {}


def test_moe_first_layer_keeps_the_first_blocks_dense():
    model = GPT2Network(cfg(moe_experts=4, n_layer=4, moe_first_layer=1))
    assert [isinstance(b.mlp, MoEMLP) for b in model.transformer.h] == [False, True, True, True]
    model = GPT2Network(cfg(moe_experts=4, n_layer=4, moe_first_layer=2, moe_every=2))
    assert [isinstance(b.mlp, MoEMLP) for b in model.transformer.h] == [False, False, False, True]


@pytest.mark.parametrize("kw", [dict(moe_experts=2, moe_top_k=3), dict(moe_experts=4, moe_capacity_factor=0),
                                dict(moe_experts=4, moe_eval_capacity_factor=-1.0),
                                dict(moe_experts=4, moe_expert_hidden=-8),
                                dict(moe_experts=4, moe_first_layer=2),  # cfg() has 2 layers
                                dict(moe_experts=4, n_layer=4, share_layers="pairs", moe_first_layer=2)])
def test_bad_moe_config_is_a_user_error(kw):
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_moe_checkpoint_round_trips_exactly_and_transformers_refuses_it(tmp_path):
    from gpt2kit.model import GPT2

    torch.manual_seed(0)
    model = GPT2(cfg(moe_experts=4, moe_top_k=2, moe_every=2, n_layer=4, share_layers="pairs")).eval()
    model.save_pretrained(tmp_path)
    back = GPT2.from_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "transformer.h.1.mlp.experts.3.c_fc.weight" in saved and "transformer.h.2.ln_1.weight" not in saved
    assert saved["transformer.h.1.mlp.experts.3.c_fc.weight"].shape == (128, 32)  # nn.Linear layout
    for n, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[n]), n
    idx = torch.randint(0, 96, (2, 10))
    assert torch.equal(model(idx).logits, back(idx).logits)
    transformers = pytest.importorskip("transformers")
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_narrow_experts_have_their_width_and_round_trip(tmp_path):
    from gpt2kit.model import GPT2

    torch.manual_seed(0)
    model = GPT2(cfg(moe_experts=4, moe_top_k=2, moe_expert_hidden=48)).eval()
    expert = model.transformer.h[0].mlp.experts[1]
    assert expert.c_fc.weight.shape == (48, 32) and expert.c_proj.weight.shape == (32, 48)
    assert model.transformer.h[0].mlp.router.weight.shape == (4, 32)
    # width 0 is GPT-2's 4C: the default model is unchanged
    assert GPT2Network(cfg(moe_experts=4)).transformer.h[0].mlp.experts[0].c_fc.weight.shape == (128, 32)
    model.save_pretrained(tmp_path)
    back = GPT2.from_pretrained(tmp_path)
    assert back.config.moe_expert_hidden == 48
    idx = torch.randint(0, 96, (2, 10))
    assert torch.equal(model(idx).logits, back(idx).logits)


def test_quantize_and_prune_cover_the_experts():
    from gpt2kit.model.quantized import quantizable_modules
    from gpt2kit.post.prune import prunable_parameters

    model = GPT2Network(cfg(moe_experts=3))
    q = quantizable_modules(model, embeddings=False)
    assert "transformer.h.0.mlp.experts.2.c_proj" in q and not any("router" in n for n in q)
    assert len(q) == 2 * (2 + 3 * 2)
    p = prunable_parameters(model)
    assert "transformer.h.1.mlp.experts.0.c_fc.weight" in p and not any("router" in n or "bias" in n for n in p)


def test_decode_fast_declines_a_variant():
    from gpt2kit.decode_fast import FastDecoder

    assert FastDecoder.supports(GPT2Network(cfg()).eval(), 1)
    assert not FastDecoder.supports(GPT2Network(cfg(moe_experts=2)).eval(), 1)
    assert not FastDecoder.supports(GPT2Network(cfg(share_layers="all")).eval(), 1)


def test_bad_input_shapes_still_raise_user_errors():
    model = GPT2Network(cfg(moe_experts=2))
    with pytest.raises(UserError):
        model(torch.zeros(3, dtype=torch.long))
