"""Mixture-of-Experts feed-forward (Switch Transformer top-1, Mixtral-style top-k).

Shapes: N tokens (B * T flattened), C = n_embd, E experts, k = top_k, A = N * k assignments.

A float32 router picks k experts per token; each expert is an ordinary GPT-2 MLP. Dispatch sorts the
assignments by expert (first choices of every token ahead of second choices, then token order: GShard's
priority), keeps the first `capacity` of each expert, gathers those tokens once and runs each expert on its
contiguous slice -- a loop over experts, never over tokens. A dropped assignment contributes 0, so its token
passes through the residual unchanged.

Losses (added to the training loss by the trainer, see `GPT2Output.aux_loss`):
- Switch load balancing `alpha * E * sum_i f_i * P_i`: f_i the share of the A assignments routed to
  expert i (before capacity), P_i the mean router probability of expert i over all N tokens (full softmax).
- ST-MoE router z-loss `coef * mean_n logsumexp(logits_n)^2`.

Checkpoint names: `transformer.h.{i}.mlp.router.weight` [E, C] and `transformer.h.{i}.mlp.experts.{e}.c_fc.weight`
etc. Expert weights are stored in nn.Linear layout (out x in): they are not HF Conv1D tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPT2Config

ROUTER_INIT_SCALE = 0.1  # Switch Transformer: router weights start 10x smaller than the rest


@dataclass
class Routing:
    """One MoE layer application's dispatch plan (the expert-parallel path reuses it)."""

    tokens: torch.Tensor  # [M] token index of each kept assignment, grouped by expert
    gates: torch.Tensor  # [M] float32 gate of each kept assignment
    kept: list[int]  # [E] kept assignments per expert (sums to M)
    routed: torch.Tensor  # [E] assignments per expert before capacity (int64)
    dropped: int  # assignments over capacity


def capacity(tokens: int, experts: int, top_k: int, factor: float) -> int:
    """Slots per expert: ceil(factor * tokens * k / E)."""
    return math.ceil(factor * tokens * top_k / experts)


def route(logits: torch.Tensor, top_k: int, cap: int) -> tuple[Routing, torch.Tensor]:
    """Top-k routing of float32 `logits` [N, E] with `cap` slots per expert. Returns (plan, probs [N, E])."""
    N, E = logits.shape
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(top_k, dim=-1)  # [N, k]
    # k = 1 keeps the raw probability as the gate (Switch: the router learns through it); k > 1
    # renormalises over the chosen experts (Mixtral)
    gates = top_p if top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
    # assignment a = j * N + n: every token's first choice ahead of any second choice
    expert = top_i.t().reshape(-1)
    order = torch.argsort(expert, stable=True)
    routed = torch.bincount(expert, minlength=E)
    starts = routed.cumsum(0) - routed
    rank_in_expert = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    keep = order[rank_in_expert < cap]  # still grouped by expert: each expert's first `cap` assignments
    kept = routed.clamp(max=cap)
    plan = Routing(
        tokens=keep % N,
        gates=gates.t().reshape(-1)[keep],
        kept=kept.tolist(),
        routed=routed,
        dropped=int(expert.numel() - keep.numel()),
    )
    return plan, probs


def load_balancing_loss(probs: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i (without alpha). f from the integer routing (no gradient), P from all probs."""
    E = probs.shape[-1]
    f = routed.to(probs.dtype) / routed.sum().clamp(min=1)
    return E * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)^2) over tokens (without the coefficient)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoEStats:
    """Per-layer counters between two reads by the trainer (plain attributes: not in the state dict)."""

    def __init__(self, experts: int):
        self.routed = torch.zeros(experts, dtype=torch.long, device="cpu")  # also under a meta-device build
        self.assignments = 0
        self.dropped = 0
        self.aux = 0.0
        self.calls = 0

    def add(self, plan: Routing, aux: float) -> None:
        self.routed += plan.routed.detach().cpu()
        self.assignments += int(plan.routed.sum())
        self.dropped += plan.dropped
        self.aux += aux
        self.calls += 1


class MoEMLP(nn.Module):
    """Drop-in for the dense MLP: [B, T, C] -> [B, T, C]. `make_expert()` builds one expert (a GPT-2 MLP)."""

    def __init__(self, config: GPT2Config, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.num_experts = config.moe_experts
        self.top_k = config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.eval_capacity_factor = config.moe_eval_capacity_factor
        self.dropless = config.moe_dropless
        self.aux_loss_coef = config.moe_aux_loss_coef
        self.z_loss_coef = config.moe_z_loss_coef
        self.router = nn.Linear(config.n_embd, self.num_experts, bias=False)
        self.experts = nn.ModuleList([make_expert() for _ in range(self.num_experts)])
        self.stats = MoEStats(self.num_experts)
        self.aux_losses: list[torch.Tensor] = []  # this forward's aux losses, collected by the network
        self.expert_parallel = None  # set by gpt2kit.train.expert_parallel: exchanges tokens between ranks

    def reset_router(self, std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=std * ROUTER_INIT_SCALE)

    def capacity(self, tokens: int) -> int:
        if self.dropless:
            return tokens  # a token picks an expert at most once: N slots never drop anything
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity(tokens, self.num_experts, self.top_k, factor)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        # float32 even under bf16 autocast: the softmax and top-k are sensitive to rounding (Switch §2.4)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(-1, C)
        logits = self.router_logits(xf)
        plan, probs = route(logits, self.top_k, self.capacity(xf.shape[0]))
        aux = self.aux_loss_coef * load_balancing_loss(probs, plan.routed) + self.z_loss_coef * z_loss(logits)
        self.aux_losses.append(aux)
        if self.training:
            self.stats.add(plan, float(aux.detach()))
        if self.expert_parallel is not None:
            ys = self.expert_parallel(self, xf, plan)
        else:
            ys = self.run_experts(xf[plan.tokens], plan.kept, range(self.num_experts))
        out = torch.zeros_like(xf)
        out.index_add_(0, plan.tokens, ys * plan.gates.unsqueeze(1).to(ys.dtype))
        return out.view(B, T, C)

    def run_experts(self, xs: torch.Tensor, counts: list[int], experts) -> torch.Tensor:
        """Each expert of `experts` on its contiguous slice of `xs` ([M, C], grouped as `counts`)."""
        # an expert without tokens still runs (on 0 rows): its gradient is then 0, not None, so data
        # parallelism sees the same parameters used on every rank
        chunks = xs.split(counts)
        return torch.cat([self.experts[e](chunk) for e, chunk in zip(experts, chunks)])


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def pop_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the aux losses of the last forward (every application of every MoE layer), then cleared."""
    total = None
    for layer in moe_layers(model):
        for aux in layer.aux_losses:
            total = aux if total is None else total + aux
        layer.aux_losses = []
    return total


def read_moe_metrics(model: nn.Module) -> dict[str, float | list[float]]:
    """Per-expert load (share of assignments; one list per MoE layer), dropped share and mean aux loss
    since the last call, then reset. {} for a model without MoE layers."""
    layers = moe_layers(model)
    if not layers:
        return {}
    loads, dropped, assignments, aux, calls = [], 0, 0, 0.0, 0
    for layer in layers:
        s = layer.stats
        loads.append([round(v / max(s.assignments, 1), 5) for v in s.routed.tolist()])
        dropped, assignments = dropped + s.dropped, assignments + s.assignments
        aux, calls = aux + s.aux, calls + s.calls
        layer.stats = MoEStats(layer.num_experts)
    busiest = max((max(load) * len(load) for load in loads), default=0.0)
    return {
        "moe_aux_loss": aux / max(calls, 1) * len(layers),
        "moe_dropped": dropped / max(assignments, 1),
        "moe_busiest_over_mean": busiest,
        "moe_load": loads,
    }
