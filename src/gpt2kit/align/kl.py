"""The KL penalty of RLHF: per-token KL to the frozen reference, reward shaping, and the KL controllers.

Per completion token t (Ziegler et al. 2019; TRL's PPO):
  kl_t      = log pi(y_t | .) - log pi_ref(y_t | .)              ("k1"; "k3" = (r - 1) - log r, r = pi_ref / pi)
  reward_t  = -kl_coef * kl_t, plus the reward model's score on the completion's last token
The adaptive controller (Ziegler et al. 2019, TRL's AdaptiveKLController) moves kl_coef toward the value
that keeps the measured KL per sample (sum over tokens, mean over the rollout) at `target`:
  kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_samples / horizon
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError

KL_ESTIMATORS = ("k1", "k3")


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL estimate of each sampled token [B, T] from the policy's and the reference's log-probs."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":  # unbiased and never negative (Schulman's k3)
        log_ratio = ref_logps - logps
        return log_ratio.exp() - 1 - log_ratio
    raise UserError(f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef * kl on completion tokens (mask 1), plus `scores` [B] on each row's
    last completion token; 0 elsewhere."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    T = mask.shape[1]
    last = (torch.arange(T, device=mask.device) * mask).argmax(-1)  # index of the last completion token
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards


class FixedKLController:
    """kl_coef stays where it was set."""

    adaptive = False

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller (TRL: AdaptiveKLController(init_kl_coef, target, horizon))."""

    adaptive = True

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(0.2, max(-0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon


def kl_controller(kl_coef: float, kl_target: float | None, horizon: int, adaptive: bool) -> FixedKLController:
    """The controller the flags ask for: adaptive when `adaptive` (target default 6 nats, as TRL's)."""
    if kl_coef < 0:
        raise UserError(f"--kl-coef must be >= 0, got {kl_coef}")
    if not adaptive:
        return FixedKLController(kl_coef)
    if kl_coef == 0:
        raise UserError("--adaptive-kl needs --kl-coef > 0 (it scales the coefficient, which cannot leave 0)")
    if kl_target is not None and not kl_target > 0:
        raise UserError(f"--kl-target must be > 0, got {kl_target}")
    if horizon < 1:
        raise UserError(f"--kl-horizon must be >= 1, got {horizon}")
    return AdaptiveKLController(kl_coef, 6.0 if kl_target is None else kl_target, horizon)
