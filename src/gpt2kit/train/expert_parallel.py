"""Expert parallelism under torchrun: each rank computes E / W of every MoE layer's experts.

Rank r owns experts [r * E/W, (r + 1) * E/W). Every rank routes its own tokens (the router and everything
else are data parallel), then one all_to_all_single sends each assignment's hidden state to the rank of its
expert, the owners run their experts, and a second all_to_all_single brings the outputs back (both through
torch.distributed.nn, so the backward exchanges the gradients the same way). Capacity, priority and the aux
losses stay per rank, exactly as for one process with the ranks' batches as micro-batches.

Weights stay replicated: an expert's gradient is non-zero on its owner only (it holds the contributions of
every rank's tokens), and the data-parallel all-reduce (DDP's mean) turns it into the global mean on every
rank. So checkpoints, the optimizer state and resume are those of plain DDP. What is sharded is the expert
compute and activation memory, not the expert weights.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from ..errors import UserError
from ..model.moe import MoEMLP, Routing, moe_layers


class ExpertExchange:
    """Installed as `MoEMLP.expert_parallel`: `(layer, xf [N, C], plan) -> expert outputs [M, C]`, in
    the plan's order (grouped by expert), like `layer.run_experts` in one process."""

    def __init__(self, rank: int, world_size: int, group=None):
        self.rank, self.world, self.group = rank, world_size, group

    def __call__(self, layer: MoEMLP, xf: torch.Tensor, plan: Routing) -> torch.Tensor:
        with warnings.catch_warnings():  # torch.distributed.nn's autograd all-to-all is marked deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return self._exchange(layer, xf, plan)

    def _exchange(self, layer: MoEMLP, xf: torch.Tensor, plan: Routing) -> torch.Tensor:
        E, W = layer.num_experts, self.world
        L = E // W
        counts = torch.tensor(plan.kept, dtype=torch.long)
        send_rows = counts.view(W, L).sum(1).tolist()
        # how many rows each rank sends me, per local expert: [W, L]
        recv = torch.empty(E, dtype=torch.long)
        dist.all_to_all_single(recv, counts, group=self.group)
        recv = recv.view(W, L)
        recv_rows = recv.sum(1).tolist()
        xs = xf[plan.tokens]
        got = dist_fn.all_to_all_single(xs.new_empty((sum(recv_rows), xs.shape[1])), xs, recv_rows, send_rows,
                                        group=self.group)
        # [source rank][local expert] -> [local expert][source rank]: each expert's rows contiguous
        pieces = got.split(recv.flatten().tolist())
        by_expert = [pieces[s * L + e] for e in range(L) for s in range(W)]
        ys = layer.run_experts(torch.cat(by_expert), recv.t().sum(1).tolist(), range(self.rank * L, (self.rank + 1) * L))
        # and back to [source rank][local expert] for the return trip
        out_pieces = ys.split(recv.t().flatten().tolist())
        back = torch.cat([out_pieces[e * W + s] for s in range(W) for e in range(L)])
        ys_home = dist_fn.all_to_all_single(xs.new_empty(xs.shape), back, send_rows, recv_rows, group=self.group)
        # the other ranks' experts run on 0 rows here: a zero gradient (not None) keeps DDP's buckets complete
        others = [e for e in range(E) if not self.rank * L <= e < (self.rank + 1) * L]
        return ys_home + layer.run_experts(xs[:0], [0] * len(others), others).sum()


def enable_expert_parallel(model: torch.nn.Module, rank: int, world_size: int, strategy: str, group=None) -> int:
    """Shard the expert compute of every MoE layer of `model` over the ranks; returns the layers changed.
    A UserError (one line) when the model has no MoE layer or E is not divisible by the world size."""
    layers = moe_layers(model)
    if not layers:
        raise UserError("--expert-parallel needs an MoE model (--moe-experts E)")
    if strategy not in ("ddp", "zero1"):
        raise UserError(f"--expert-parallel composes with --strategy ddp or zero1, got {strategy!r}")
    E = layers[0].num_experts
    if E % world_size:
        raise UserError(f"--expert-parallel: moe_experts={E} is not divisible by the world size {world_size}")
    if world_size == 1:
        return 0
    exchange = ExpertExchange(rank, world_size, group)
    for layer in layers:
        layer.expert_parallel = exchange
    return len(layers)
