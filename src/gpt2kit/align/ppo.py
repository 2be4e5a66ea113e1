"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), with TRL's formulas.

The value function is a scalar head on the policy's own final hidden state (TRL's
AutoModelForCausalLMWithValueHead): one trunk forward gives the logits and the values, and no third model
(next to the policy and the frozen reference) is held in memory or trained. The price is that the value
loss also moves the shared trunk; `vf_coef` (0.1, as TRL) keeps it small next to the policy loss.

Per rollout (completion tokens only; `mask` 1 on them):
  rewards_t   = -kl_coef * (log pi_old - log pi_ref)_t, + the score on the last token   (align.kl)
  delta_t     = rewards_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}   (GAE, V = 0 past the end)
  returns_t   = A_t + V_t;  A whitened over the rollout's tokens
then `ppo_epochs` passes over shuffled minibatches, each one optimizer step on
  pg  = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - cliprange, 1 + cliprange)),  ratio = pi / pi_old
  vf  = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c_v, V_old + c_v) - R_t)^2)
  loss = pg + vf_coef * vf
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class PPOConfig:
    """TRL's PPO defaults: gamma 1, lam 0.95, clip 0.2 / 0.2, vf_coef 0.1, 4 epochs."""

    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_minibatches: int = 1
    whiten_advantages: bool = True


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL's masked_whiten)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1).clamp(min=1))
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalized advantage estimation over the masked positions of each
    row (one contiguous completion per row; the value after a row's last token is 0). Outside the mask
    both are 0."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(clipped policy loss, clipped value loss, stats) over the masked tokens [B, T]."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        stats = {"clipfrac": float(masked_mean((pg2 > pg1).to(mask.dtype), mask)),
                 "vf_clipfrac": float(masked_mean((vf2 > vf1).to(mask.dtype), mask)),
                 "approx_kl": float(0.5 * masked_mean((logps - old_logps) ** 2, mask))}
    return pg_loss, vf_loss, stats


class PolicyWithValue(nn.Module):
    """The policy GPT2 and a scalar value head on its final (post-ln_f) hidden state.
    forward(idx) -> (token log-probs [B, T - 1] of idx[:, 1:], values [B, T - 1] of the states before them)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)
        self._hidden: torch.Tensor | None = None
        policy.transformer.ln_f.register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, inputs, output) -> None:
        self._hidden = output

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(idx).logits[:, :-1].float()
        hidden, self._hidden = self._hidden, None
        logps = torch.gather(logits.log_softmax(-1), 2, idx[:, 1:].unsqueeze(-1)).squeeze(-1)
        values = self.value_head(hidden[:, :-1].float()).squeeze(-1)
        return logps, values


def ppo_update(pv: PolicyWithValue, opt, step: int, idx: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
               ref_logps: torch.Tensor, kl_coef: float, cfg: PPOConfig, seed: int,
               kl_estimator: str = "k1") -> dict[str, float]:
    """One PPO iteration on a rollout (ids [N, T], completion mask [N, T - 1]); returns its metrics."""
    from .kl import per_token_kl, shaped_rewards

    m = mask.float()
    with torch.no_grad():
        old_logps, old_values = pv(idx)
        old_values = old_values * m
        kl = per_token_kl(old_logps, ref_logps, kl_estimator) * m
        rewards = shaped_rewards(scores, kl, m, kl_coef)
        adv, returns = gae(rewards, old_values, m, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, m) * m
    n = idx.shape[0]
    g = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=g)
        for mb in order.chunk(max(1, min(cfg.num_minibatches, n))):
            logps, values = pv(idx[mb])
            pg, vf, stats = ppo_losses(logps, old_logps[mb], adv[mb], values, old_values[mb], returns[mb], m[mb],
                                       cfg.cliprange, cfg.cliprange_value)
            norm = opt.step(step, pg + cfg.vf_coef * vf)
            for k, v in {"pg_loss": pg.item(), "vf_loss": vf.item(), "grad_norm": norm, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
    out: dict[str, Any] = {k: v / updates for k, v in sums.items()}
    out["loss"] = out["pg_loss"] + cfg.vf_coef * out["vf_loss"]
    out["kl"] = float(kl.sum(-1).mean())
    out["non_score_reward"] = float((-kl_coef * kl).sum(-1).mean())
    out["value_mean"] = float(masked_mean(old_values, m))
    return out
