"""Muon (Jordan et al. 2024) for the hidden weight matrices, AdamW for everything else, in one optimizer.

Muon keeps a Nesterov momentum of each matrix's gradient and replaces it by the nearest
semi-orthogonal matrix (five Newton-Schulz iterations of the quintic in Jordan's write-up) before the
update, so every direction of the matrix moves at the same rate. At the small scales the built-in demo
trains on a CPU it reaches a given loss in fewer steps than AdamW; see docs/train.md for the measurement.

The update is scaled as in Moonlight (Liu et al. 2025), 0.2 * sqrt(max(rows, cols)), which gives it the
root-mean-square of a typical AdamW update: one learning rate and one schedule serve both kinds of
parameter. Embeddings (the tied head among them), biases and LayerNorm gains take AdamW, as every
Muon recipe does. GPT-2's fused query/key/value matrix is orthogonalised as its three blocks (the
`split` of its group), each a matrix of its own. MoE experts are separate modules (model/moe.py), so
each expert's matrices are orthogonalised on their own, never one expert's update mixed into
another's; tensors of more than two dimensions (stacked experts) would be orthogonalised per leading
index. An MoE router [E, C] takes AdamW: it is a small classifier whose logits' scale decides the
routing, and orthogonalising its update would push every one of its E directions at the same rate,
the rarely chosen experts' as hard as the busy ones' (Muon recipes give output heads AdamW likewise).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# the quintic Newton-Schulz coefficients of Jordan's Muon (fast convergence of the singular values to ~1)
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately semi-orthogonal matrix U V^T of g = U S V^T (per leading index for > 2-D)."""
    a, b, c = _NS_COEFFS
    x = g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix x x^T is the smaller one
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)  # singular values into [0, 1]
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Three groups: hidden matrices (Muon; the fused q/k/v split in three), and AdamW with and without
    decay. Embeddings and MoE routers are AdamW's (the tied head with the embeddings); each tensor appears
    once."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    qkv, hidden, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and id(p) not in embedding_params and not name.endswith("mlp.router.weight"):
            (qkv if name.endswith("attn.c_attn.weight") else hidden).append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": hidden, "use_muon": True, "split": 1, "weight_decay": weight_decay},
        {"params": qkv, "use_muon": True, "split": 3, "weight_decay": weight_decay},
        {"params": no_decay, "use_muon": False, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class Muon(torch.optim.Optimizer):
    """Groups with `use_muon=True` take Muon (momentum, nesterov, ns_steps, split, weight_decay); the
    others take bias-corrected AdamW (betas, eps, weight_decay). Decay is decoupled in both: p *= 1 - lr*wd."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be at least 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, betas=betas, eps=eps,
                        weight_decay=weight_decay, use_muon=False, split=1)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd, mu, split = group["lr"], group["weight_decay"], group["momentum"], group["split"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1.0 - mu)
            u = g.lerp(buf, mu) if group["nesterov"] else buf
            if split > 1:  # the fused [3C, C] q/k/v matrix: three [C, C] matrices
                u = torch.cat([orthogonalize(part, group["ns_steps"]) for part in u.chunk(split, dim=-2)], dim=-2)
            else:
                u = orthogonalize(u, group["ns_steps"])
            rows, cols = u.shape[-2] // split, u.shape[-1]
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                     exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        for s in states:
            s["step"] += 1
        t = float(states[0]["step"])  # one step count per group: every tensor steps together
        if wd:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
        bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -lr / bias1)
