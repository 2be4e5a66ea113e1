"""AdamW with GPT-2's parameter groups, and learning-rate schedules as pure functions of the step.

Weight decay applies to the 2-D weight matrices of the linear layers only: never to biases, LayerNorm
gains, or the (tied) token and position embeddings, whose rows a decay would pull towards zero whether a
token occurs or not.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params decayed, weight_decay}, {params not decayed, weight_decay 0}], each tensor once (ties)."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_params or name.split(".")[-2:-1] in (["wte"], ["wpe"])
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW takes plain (non-DTensor) floating tensors on CPU or CUDA."""
    if not params:
        return False
    for p in params:
        if type(p.data) is not torch.Tensor or p.device.type not in ("cpu", "cuda"):
            return False
        if not p.is_floating_point():
            return False
    return True


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """torch.optim.AdamW (bias-corrected) over `param_groups`; fused kernel where it exists, else foreach."""
    groups = param_groups(model, weight_decay)
    all_params = [p for g in groups for p in g["params"]]
    if not all_params:
        raise UserError("the model has no trainable parameters")
    if fused is None:
        fused = _fused_ok(all_params)
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def optimizer_for(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """The one-process optimizer a run's `[optim]` section asks for: AdamW, or Muon + AdamW (train/muon.py)."""
    o = optim_cfg
    if o.optimizer == "muon":
        from .muon import Muon, muon_param_groups

        return Muon(muon_param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    return build_optimizer(model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)


# --- schedules -----------------------------------------------------------------------------------------
# `step` is the 0-based index of the optimizer update about to be taken; t = step + 1 counts updates from 1,
# so the first update never runs at learning rate 0.


def inverse_sqrt_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """The Transformer schedule eta_t = eta0 * min(t^-0.5, t * w^-1.5) with eta0 = peak_lr * sqrt(w).

    It rises linearly for w steps to `peak_lr` at t = w, then decays as peak_lr * sqrt(w / t).
    """
    t = step + 1
    w = max(1, warmup_steps)
    eta0 = peak_lr * math.sqrt(w)
    return eta0 * min(t**-0.5, t * w**-1.5)


def cosine_lr(step: int, peak_lr: float, warmup_steps: int, max_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `peak_lr` over `warmup_steps`, then a half cosine down to `min_lr` at `max_steps`."""
    t = step + 1
    if warmup_steps > 0 and t <= warmup_steps:
        return peak_lr * t / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (t - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def constant_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then `peak_lr`."""
    t = step + 1
    if warmup_steps > 0 and t <= warmup_steps:
        return peak_lr * t / warmup_steps
    return peak_lr


def lr_at(step: int, schedule: str, peak_lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    if schedule == "cosine":
        return cosine_lr(step, peak_lr, warmup_steps, max_steps, min_lr)
    if schedule == "inverse_sqrt":
        return inverse_sqrt_lr(step, peak_lr, warmup_steps)
    if schedule == "constant":
        return constant_lr(step, peak_lr, warmup_steps)
    raise UserError(f"--schedule must be cosine, inverse_sqrt or constant, got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
