"""PPO and the KL controller: GAE, the clipped losses and the reward shaping against hand computations,
Ziegler's adaptive controller against its formula, and tiny runs where the reward rises."""

from __future__ import annotations

import json

import pytest
import torch
from align_helpers import tiny_checkpoint

from gpt2kit.errors import UserError


def test_gae_equals_a_hand_computation():
    from gpt2kit.align.ppo import gae

    # row 0: prompt at t=0, completion t=1..3; row 1: completion t=0..1, then padding (its numbers ignored)
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 3.0, 5.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 1.5], [0.2, 0.4, 7.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # by hand: delta_t = r_t + 0.9 V_{t+1} - V_t (V = 0 after the last token), A_t = delta_t + 0.72 A_{t+1}
    a3 = 2 - 1.5
    a2 = (0 + 0.9 * 1.5 - 1.0) + 0.72 * a3
    a1 = (1 + 0.9 * 1.0 - 0.5) + 0.72 * a2
    b1 = 3 - 0.4
    b0 = (1 + 0.9 * 0.4 - 0.2) + 0.72 * b1
    want = torch.tensor([[0, a1, a2, a3], [b0, b1, 0, 0]])
    assert torch.allclose(adv, want, atol=1e-6)
    assert torch.allclose(ret, (want + values) * mask, atol=1e-6)


def test_clipped_policy_and_value_losses_equal_a_hand_computation():
    from gpt2kit.align.ppo import ppo_losses

    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    values = torch.tensor([[0.5, -0.1, 0.3]])
    returns = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    pg, vf, stats = ppo_losses(logps, old, adv, values, torch.zeros(1, 3), returns, mask, 0.2, 0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), 0.8 (clipped), -2.2 (inside the range)
    assert pg.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    pg.backward()
    # clipped tokens pass no gradient; the third: d(-A r)/d log pi = -A r / 3
    assert torch.allclose(logps.grad, torch.tensor([[0.0, 0.0, -2.0 * 1.1 / 3]]), atol=1e-6)
    # V clipped to old +- 0.2 = [0.2, -0.1, 0.2]; max of the squared errors: 0.64, 1.21, 1.69
    assert vf.item() == pytest.approx(0.5 * (0.64 + 1.21 + 1.69) / 3)


def test_whitening_has_zero_mean_and_unit_unbiased_variance_over_the_mask():
    from gpt2kit.align.ppo import masked_whiten

    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = masked_whiten(x, mask)[mask.bool()]
    assert w.mean().item() == pytest.approx(0, abs=1e-6)
    assert w.var(unbiased=True).item() == pytest.approx(1, abs=1e-5)


def test_per_token_kl_and_reward_shaping():
    from gpt2kit.align.kl import per_token_kl, shaped_rewards

    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.allclose(per_token_kl(logp, ref), torch.tensor([[0.5, -1.0, 0.0]]))
    k3 = per_token_kl(logp, ref, "k3")  # (r - 1) - log r with r = pi_ref / pi: never negative
    r = torch.exp(ref - logp)
    assert torch.allclose(k3, r - 1 - torch.log(r)) and (k3 >= 0).all()
    kl = torch.tensor([[9.0, 0.5, -1.0, 9.0], [0.2, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    got = shaped_rewards(torch.tensor([2.0, 3.0]), kl, mask, kl_coef=0.1)
    # -0.1 * kl on completion tokens, the score added on each row's last completion token
    assert torch.allclose(got, torch.tensor([[0.0, -0.05, 0.1 + 2.0, 0.0], [-0.02, -0.04 + 3.0, 0.0, 0.0]]))


def test_adaptive_kl_controller_follows_ziegler_et_al():
    from gpt2kit.align.kl import AdaptiveKLController, kl_controller

    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(12.0, 256)  # error clipped to +0.2
    assert c.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    v = c.value
    c.update(5.4, 256)  # error -0.1
    assert c.value == pytest.approx(v * (1 - 0.1 * 256 / 10000))
    fixed = kl_controller(0.3, None, 10000, adaptive=False)
    fixed.update(100.0, 256)
    assert fixed.value == 0.3 and not fixed.adaptive
    assert kl_controller(0.3, None, 10000, adaptive=True).target == 6.0  # TRL's default target
    with pytest.raises(UserError, match="--kl-target must be > 0"):
        kl_controller(0.3, -1.0, 10000, adaptive=True)


def says_a_lot_of_a(prompts, completions):
    """Reward for tests: the letter 'a', as often as possible."""
    return [c.count("a") / 4 for c in completions]


def test_ppo_raises_the_reward(tmp_path):
    from gpt2kit.align.rlhf import train_rlhf
    from gpt2kit.model import GPT2

    init = tiny_checkpoint(tmp_path / "init")
    r = train_rlhf(init, says_a_lot_of_a, tmp_path / "out", algo="ppo", k=4, kl_coef=0.01, max_new_tokens=8,
                   overrides={"max_steps": 20, "lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "schedule": "constant"},
                   eval_samples=24, log=lambda m: None)
    assert r["reward_after"] > r["reward_before"] + 0.5, r
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"pg_loss", "vf_loss", "clipfrac", "kl", "kl_coef", "non_score_reward"} <= set(rows[0])
    GPT2.from_pretrained(tmp_path / "out")  # the value head stays out of the checkpoint


def test_adaptive_kl_raises_the_coefficient_while_the_kl_is_over_target(tmp_path):
    from gpt2kit.align.rlhf import train_rlhf

    init = tiny_checkpoint(tmp_path / "init")
    r = train_rlhf(init, says_a_lot_of_a, tmp_path / "out", algo="rloo", k=4, kl_coef=0.01, kl_target=0.5,
                   kl_horizon=50, max_new_tokens=8, eval_samples=8, log=lambda m: None,
                   overrides={"max_steps": 12, "lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "schedule": "constant"})
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"kl"' in x]
    for a, b in zip(rows, rows[1:]):  # each step's coefficient is the last one moved by the last KL
        err = max(-0.2, min(0.2, a["kl"] / 0.5 - 1))
        assert b["kl_coef"] == pytest.approx(a["kl_coef"] * (1 + err * 16 / 50))
    assert r["kl_coef_final"] != 0.01
