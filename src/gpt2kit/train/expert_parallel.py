"""Expert parallelism under torchrun: each rank holds, trains and stores E / W of every MoE layer's experts.

Rank r owns experts [r * E/W, (r + 1) * E/W) of every MoE layer and keeps only those (weights, gradients,
AdamW state): `shard_experts` drops the others from its model. The expert-parallel group is the whole job,
so the rest of the model (attention, router, embeddings, dense MLPs) is data parallel over the same ranks.

Forward: every rank routes its own tokens (capacity, priority and the aux losses stay per rank, exactly
as for one process with the ranks' batches as micro-batches), one all_to_all_single sends each kept
assignment's hidden state to the rank of its expert, the owners run their experts, and a second
all_to_all_single brings the outputs back. Both go through torch.distributed.nn, so the backward
exchanges the gradients the same way and an expert's gradient on its owner already holds every rank's
tokens. Gloo (CPU) and NCCL both implement all_to_all_single.

Gradients: DDP ignores the expert parameters (they differ per rank, so averaging them would mix
different experts); everything else is all-reduced by DDP as usual. The trainer scales each rank's loss
by W for DDP's mean, so an expert gradient is divided by W here (a tensor hook). The gradient-norm clip
adds the ranks' expert norms (an all-reduce of the squared norm).

FSDP for the dense part (`--strategy fsdp`): `fully_shard` is given the experts as `ignored_params`, so
it shards, gathers and reduce-scatters (a mean, like DDP's) only the dense parameters; the experts stay
plain tensors owned by one rank, exactly as under DDP. ZeRO-1 is refused: ZeroRedundancyOptimizer
partitions one parameter list over the ranks and broadcasts each updated tensor from its owner, which
would overwrite one rank's experts with another's (they sit at the same positions of the list).

Checkpoints: `gather_state_dict` sends the experts to rank 0 one tensor at a time, which writes the same
HF-style directory as a one-process run (eval / generate / quantize load it unchanged). The optimizer
state goes through torch.distributed.checkpoint keyed by parameter name like DDP's, each rank writing
its own experts' state, so an expert-parallel run resumes in one process, under DDP, or under expert
parallel again (bitwise on CPU with the same world size).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.tensor import DTensor

from ..errors import UserError
from ..model.moe import MoEMLP, Routing, moe_layers
from . import distributed as dist_api

_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # how a step runs, not what it computes


class LocalExperts(nn.Module):
    """This rank's experts of one MoE layer, registered under their global indices, so parameter names
    are the one-process model's (`...mlp.experts.2.c_fc.weight`) and `experts[e]` takes a global e."""

    def __init__(self, experts: dict[int, nn.Module]):
        super().__init__()
        for e, module in experts.items():
            self.add_module(str(e), module)

    def __getitem__(self, e: int) -> nn.Module:
        return self._modules[str(e)]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ExpertExchange:
    """Installed as `MoEMLP.expert_parallel`: `(layer, xf [N, C], plan) -> expert outputs [M, C]`, in
    the plan's order (grouped by expert), like `layer.run_experts` in one process."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world = rank, world_size

    def __call__(self, layer: MoEMLP, xf: torch.Tensor, plan: Routing) -> torch.Tensor:
        with warnings.catch_warnings():  # torch.distributed.nn's autograd all-to-all is marked deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return self._exchange(layer, xf, plan)

    def _exchange(self, layer: MoEMLP, xf: torch.Tensor, plan: Routing) -> torch.Tensor:
        E, W = layer.num_experts, self.world
        L = E // W
        counts = torch.tensor(plan.kept, dtype=torch.long, device=xf.device)  # NCCL takes device tensors only
        send_rows = counts.view(W, L).sum(1).tolist()
        # how many rows each rank sends me, per local expert: [W, L]
        recv = torch.empty(E, dtype=torch.long, device=xf.device)
        dist.all_to_all_single(recv, counts)
        recv = recv.view(W, L).cpu()
        recv_rows = recv.sum(1).tolist()
        xs = xf[plan.tokens]
        got = dist_fn.all_to_all_single(xs.new_empty((sum(recv_rows), xs.shape[1])), xs, recv_rows, send_rows)
        # [source rank][local expert] -> [local expert][source rank]: each expert's rows contiguous
        pieces = got.split(recv.flatten().tolist())
        by_expert = [pieces[s * L + e] for e in range(L) for s in range(W)]
        ys = layer.run_experts(torch.cat(by_expert), recv.t().sum(1).tolist(), range(self.rank * L, (self.rank + 1) * L))
        # and back to [source rank][local expert] for the return trip
        out_pieces = ys.split(recv.t().flatten().tolist())
        back = torch.cat([out_pieces[e * W + s] for s in range(W) for e in range(L)])
        return dist_fn.all_to_all_single(xs.new_empty(xs.shape), back, send_rows, recv_rows)


def check_expert_parallel(model: nn.Module, world_size: int, strategy: str) -> list[MoEMLP]:
    """The model's MoE layers, or a UserError (one line): no MoE layer, a strategy other than ddp, or E
    not divisible by the world size."""
    layers = moe_layers(model)
    if not layers:
        raise UserError("--expert-parallel needs an MoE model (--moe-experts E)")
    if strategy not in ("ddp", "fsdp"):
        # ZeRO-1 partitions one replicated parameter list and broadcasts each tensor from its owner: the
        # ranks' experts are different tensors at the same positions, so one rank's would overwrite another's
        raise UserError(f"--expert-parallel composes with --strategy ddp or fsdp (the dense part sharded), "
                        f"not {strategy!r}: ZeRO-1 would broadcast one rank's experts over another's")
    E = layers[0].num_experts
    if E % world_size:
        raise UserError(f"--expert-parallel: moe_experts={E} is not divisible by the world size {world_size}")
    return layers


class ExpertShards:
    """The expert-parallel side of one model on one rank (built by `shard_experts`)."""

    def __init__(self, model: nn.Module, layers: list[MoEMLP], rank: int, world_size: int):
        self.rank, self.world = rank, world_size
        self.experts = layers[0].num_experts
        self.local = self.experts // world_size
        self.owned = range(rank * self.local, (rank + 1) * self.local)
        # the one-process model's parameter order (AdamW groups list names in it) and one expert's tensors
        self.full_names = [name for name, _ in model.named_parameters()]
        layer_names = {id(m): name for name, m in model.named_modules()}
        self.layer_names = [layer_names[id(layer)] for layer in layers]
        expert0 = layers[0].experts[0]
        self.expert_numel = sum(p.numel() for p in expert0.parameters())
        self.expert_tensors = {k: (tuple(v.shape), v.dtype) for k, v in expert0.state_dict().items()}
        for layer in layers:
            layer.experts = LocalExperts({e: layer.experts[e] for e in self.owned})
        names = {id(p): name for name, p in model.named_parameters()}
        self.params = [p for layer in layers for p in layer.experts.parameters()]
        self.param_names = [names[id(p)] for p in self.params]
        self._expert_ids = {id(p) for p in self.params}
        self._model = model
        W = world_size
        for p in self.params:
            # the trainer weights each rank's loss by W for DDP's mean; DDP does not see these
            p.register_hook(lambda g: g / W)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, self.param_names)
        exchange = ExpertExchange(rank, world_size)
        for layer in layers:
            layer.expert_parallel = exchange

    @property
    def dense_params(self) -> list[nn.Parameter]:
        """Every parameter but this rank's experts, read from the model each time: FSDP replaces the
        dense parameters by DTensor ones when it wraps the model (the ignored experts stay)."""
        return [p for p in self._model.parameters() if id(p) not in self._expert_ids]

    @property
    def ignored_params(self) -> set[nn.Parameter]:
        """This rank's expert parameters: what FSDP must leave alone (wrap_model's ignored_params)."""
        return set(self.params)

    def num_params(self, local: int) -> int:
        """The whole model's parameter count from this rank's (every rank holds as many experts)."""
        return local + (self.world - 1) * self.local * len(self.layer_names) * self.expert_numel

    # --- gradients ------------------------------------------------------------------------------------

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global norm (dense gradients are equal on every rank after DDP, the experts' are
        summed over ranks); returns it, the same on every rank."""
        def norm_sq(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                return torch.zeros((), device=device)
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
            if isinstance(norm, DTensor):  # FSDP: each rank holds shards of the dense gradients
                norm = norm.full_tensor()
            return norm.square()

        device = self.dense_params[0].device
        experts = norm_sq(self.params, device).to(device)
        dist.all_reduce(experts)
        total = (norm_sq(self.dense_params, device) + experts).sqrt()
        # two calls: one foreach kernel cannot take FSDP's DTensor gradients and the experts' plain ones
        for group in (self.dense_params, self.params):
            params = [p for p in group if p.grad is not None]
            if params:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total

    # --- model state ----------------------------------------------------------------------------------

    def gather_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The one-process state dict as CPU tensors on rank 0 ({} elsewhere). A collective: the owners
        send their experts to rank 0 one tensor at a time (rank 0 never holds a second copy of a rank)."""
        bare = dist_api.unwrap(model)
        local = bare.state_dict()
        device = next(bare.parameters()).device
        full = {}
        for k, v in local.items():  # the same order on every rank: FSDP's full_tensor is a collective
            v = v.full_tensor() if isinstance(v, DTensor) else v
            if self.rank == 0:
                full[k] = v.detach().to("cpu", copy=True)
        for layer in self.layer_names:
            for e in range(self.local, self.experts):  # rank 0 owns the first E/W
                owner = e // self.local
                if self.rank not in (0, owner):
                    continue
                for suffix, (shape, dtype) in self.expert_tensors.items():
                    name = f"{layer}.experts.{e}.{suffix}"
                    if self.rank == owner:
                        dist.send(local[name].detach().contiguous(), dst=0)
                    else:
                        buf = torch.empty(shape, dtype=dtype, device=device)
                        dist.recv(buf, src=owner)
                        full[name] = buf.cpu()
        return full

    # --- optimizer state ------------------------------------------------------------------------------

    def _global_group_names(self, group: list[str]) -> list[str]:
        """A parameter group's names as the one-process model lists them (every rank's experts)."""
        pattern = {_EXPERT.sub(".experts.*.", n) for n in group}
        return [n for n in self.full_names if _EXPERT.sub(".experts.*.", n) in pattern]

    def _optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """get_optimizer_state_dict's layout ({"state": {name: {...}}, "param_groups": [...]}) with this
        rank's tensors and the one-process group lists, the same on every rank."""
        names = {id(p): name for name, p in dist_api.unwrap(model).named_parameters()}
        state = {names[id(p)]: dict(optimizer.state[p]) for g in optimizer.param_groups for p in g["params"]
                 if p in optimizer.state}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": self._global_group_names([names[id(p)] for p in g["params"]])}
                  for g in optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    def save_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, path_dir: str | Path) -> None:
        """DCP, as `distributed.save_optimizer_state`: the dense state once, each expert's by its owner."""
        import torch.distributed.checkpoint as dcp

        dcp.save({dist_api._OPTIM_KEY: self._optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path_dir))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, path_dir: str | Path) -> None:
        """Load this rank's share of any gpt2kit optimizer checkpoint (one process, DDP, expert parallel)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        path_dir = Path(path_dir)
        if not (path_dir / ".metadata").is_file():
            raise UserError(f"{path_dir}: not a complete optimizer checkpoint (no .metadata written)")
        dist_api._init_local_state(optimizer)
        template = self._optimizer_state_dict(model, optimizer)
        try:
            dcp.load({dist_api._OPTIM_KEY: template}, checkpoint_id=str(path_dir))
        except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
            raise UserError(f"{path_dir}: optimizer checkpoint does not fit this model/optimizer "
                            f"({dist_api._cause(e)})") from e
        names = {id(p): name for name, p in dist_api.unwrap(model).named_parameters()}
        for g, loaded in zip(optimizer.param_groups, template["param_groups"]):
            for p in g["params"]:
                optimizer.state[p] = template["state"][names[id(p)]]
            # the hyperparameters come from the checkpoint, the kernel choice stays this run's: a DDP run's
            # fused AdamW cannot step FSDP's DTensors next to the experts' plain tensors
            g.update({k: v for k, v in loaded.items() if k not in ("params", *_KERNEL_FLAGS)})


def shard_experts(model: nn.Module, rank: int, world_size: int, strategy: str) -> ExpertShards | None:
    """Keep only this rank's experts of every MoE layer of `model` (call before wrapping it in DDP and
    before building the optimizer); None for one process. A UserError (one line) when the model has no
    MoE layer, the strategy is neither ddp nor fsdp, or E is not divisible by the world size."""
    layers = check_expert_parallel(model, world_size, strategy)
    if world_size == 1:
        return None
    return ExpertShards(model, layers, rank, world_size)


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` this process holds (an FSDP DTensor: its shard, not the global tensor)."""
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def expert_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds in expert vs other ("dense") parameters and their optimizer state."""
    out = {"expert_params": 0, "dense_params": 0, "expert_optim": 0, "dense_optim": 0}
    seen: set[int] = set()
    for name, p in dist_api.unwrap(model).named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "expert" if _EXPERT.search(name) else "dense"
        out[f"{kind}_params"] += _local_bytes(p)
        if optimizer is not None and p in optimizer.state:
            out[f"{kind}_optim"] += sum(_local_bytes(t) for t in optimizer.state[p].values()
                                        if isinstance(t, torch.Tensor))
    return out


__all__ = ["ExpertExchange", "ExpertShards", "LocalExperts", "check_expert_parallel", "expert_bytes",
           "shard_experts"]
