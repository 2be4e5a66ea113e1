"""Data-parallel training on PyTorch's own engine: `torchrun`, DDP, FSDP2 and ZeRO-1.

One process per device. `torchrun` starts them and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; without those variables everything here degrades to a plain single process (no process
group, every helper a no-op or identity), so the trainer calls the same functions either way.

Strategies (`wrap_model` + `build_optimizer`):
- `ddp`   : every rank holds the full model, gradients and AdamW state; gradients are all-reduced.
- `zero1` : DDP for the gradients, `ZeroRedundancyOptimizer` shards the AdamW state (ZeRO stage 1).
- `fsdp`  : FSDP2 `fully_shard` on each transformer block, then on the root (which keeps the tied
            wte / lm_head tensor in one group). Parameters, gradients and AdamW state are sharded
            (ZeRO-3); `reshard_after_forward=False` keeps the gathered block parameters until backward
            (ZeRO-2 style: less communication, more memory).
- `none`  : the bare model (single process).

Checkpoints: the model is gathered into one full state dict on rank 0 (the normal checkpoint
directory), and the optimizer state is written with `torch.distributed.checkpoint` (DCP) in a
world-size independent layout (parameter names + global tensor shapes), so a run saved by N ranks
resumes on M ranks, with any of the strategies, or in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..model.meta import on_meta

STRATEGIES = ("ddp", "fsdp", "zero1", "none")

# DCP top-level key of the optimizer state; keeps room for other entries in the same checkpoint.
_OPTIM_KEY = "optimizer"


# ----- process group -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. `backend` is None when there is no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when a process group is up (even with world_size 1, e.g. `torchrun --nproc_per_node=1`)."""
        return self.backend is not None


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r}: expected an integer (set by torchrun)") from None


def _resolve_device(device: str | torch.device | None, local_rank: int, distributed: bool) -> torch.device:
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if distributed and dev.index is None:
            # One process per GPU: the local rank picks the card on this node.
            if local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                    "start at most that many processes per node (--nproc_per_node)"
                )
            dev = torch.device("cuda", local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str | torch.device | None = None, timeout_s: float | None = None) -> DistEnv:
    """Join the job that `torchrun` started (NCCL on CUDA, Gloo on CPU), or describe a single process.

    `device` None/"auto" picks CUDA when available. Under torchrun, "cuda" means "cuda:LOCAL_RANK".
    Idempotent: a second call returns the same description without re-initialising.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        dev = _resolve_device(device, 0, distributed=False)
        return DistEnv(device=dev)

    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"RANK is set but {name} is not: start the job with torchrun")
    dev = _resolve_device(device, local_rank, distributed=True)
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {dev.type}: under torchrun only cpu (Gloo) and cuda (NCCL) are supported")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this GPU eagerly
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    else:
        backend = dist.get_backend()
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=dev,
        is_main=rank == 0,
        backend=backend,
    )


def cleanup() -> None:
    """Tear down the process group (if any); safe to call always."""
    if _pg_up():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def all_reduce_mean(value: torch.Tensor | float, env: DistEnv) -> torch.Tensor | float:
    """Mean over ranks (for logging). Returns the same kind it was given: a tensor or a float."""
    as_float = not isinstance(value, torch.Tensor)
    t = torch.tensor(float(value), device=env.device) if as_float else value.detach().clone()
    if env.distributed and env.world_size > 1:
        if not t.is_floating_point():
            t = t.double()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / env.world_size
    return t.item() if as_float else t


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on at least one (a stop request, a non-finite loss)."""
    if not (env.distributed and env.world_size > 1):
        return bool(flag)
    t = torch.tensor(1.0 if flag else 0.0, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ----- wrapping --------------------------------------------------------------------------------------


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _is_ddp(module: nn.Module) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """The model and every wrapper inside it: torch.compile's OptimizedModule, DDP, then the bare model."""
    seen = model
    while True:
        yield seen
        if hasattr(seen, "_orig_mod") and isinstance(seen._orig_mod, nn.Module):  # torch.compile
            seen = seen._orig_mod
        elif _is_ddp(seen):
            seen = seen.module
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers. (FSDP2 modifies the module in place, so an
    FSDP model unwraps to itself, with sharded DTensor parameters.)"""
    *_, inner = _wrappers(model)
    return inner


def _find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    return next((m for m in _wrappers(model) if _is_ddp(m)), None)


def _find_fsdp_root(model: nn.Module) -> nn.Module | None:
    inner = unwrap(model)
    return inner if _is_fsdp(inner) else None


def is_sharded(model: nn.Module) -> bool:
    """True under FSDP: each rank holds only shards, so saving needs gather_full_state_dict (a collective)."""
    return _find_fsdp_root(model) is not None


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the first ModuleList named h/blocks/layers."""
    for name in ("h", "blocks", "layers"):
        for full_name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and full_name.split(".")[-1] == name:
                return list(module)
    raise ValueError(f"{type(model).__name__}: no ModuleList named h/blocks/layers to shard block by block")


def _mp_policy(mixed_precision: str | torch.dtype | None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision is None or mixed_precision in ("fp32", "float32", torch.float32):
        return MixedPrecisionPolicy()
    dtypes = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    dtype = mixed_precision if isinstance(mixed_precision, torch.dtype) else dtypes.get(str(mixed_precision))
    if dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"mixed precision {mixed_precision!r}: expected bf16, fp16 or fp32")
    # Compute in low precision, keep sharded master weights and reduce gradients in fp32.
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def wrap_model(
    model: nn.Module,
    strategy: str,
    env: DistEnv,
    reshard_after_forward: bool = True,
    mixed_precision: str | torch.dtype | None = None,
    ignored_params: set[nn.Parameter] | None = None,
) -> nn.Module:
    """Make `model` data-parallel with `strategy`; identity for one process.

    Build the optimizer (and its parameter groups) AFTER this call: FSDP replaces the parameters by
    sharded DTensor parameters. Load resume weights into the bare model BEFORE it (DDP broadcasts
    rank 0's weights; FSDP shards whatever each rank holds).
    `mixed_precision` only affects FSDP (its parameter all-gather dtype); DDP uses the trainer's autocast.
    `ignored_params` (FSDP only): parameters FSDP leaves alone -- not sharded, not gathered, gradients not
    reduced (expert parallelism's experts, which differ per rank; train/expert_parallel.py).
    """
    _check_strategy(strategy)
    if strategy == "none" or not env.distributed or env.world_size == 1:
        return model
    if strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = model.to(env.device)
        return DDP(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            forward_sync_buffers=False,  # GPT-2's buffers are constants (causal mask): sync once at init only
            gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy, not two
        )
    # fsdp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = _mp_policy(mixed_precision)
    ignored = set(ignored_params) if ignored_params else None
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                    ignored_params=ignored)
    # The root group holds what no block owns: wte (tied with lm_head: one tensor, one group), wpe, ln_f.
    # It is needed again as soon as backward starts, so keep it gathered after forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, ignored_params=ignored)
    return model


def shard_from_meta(
    build: Callable[[], nn.Module],
    full_state: Callable[[], dict[str, torch.Tensor]],
    env: DistEnv,
    reshard_after_forward: bool = True,
    mixed_precision: str | torch.dtype | None = None,
) -> nn.Module:
    """An FSDP model without the whole model on every rank: `build()` runs on the meta device (no
    memory), `fully_shard` splits it, `to_empty` gives each rank storage for its shards only, and rank
    0's `full_state()` (a fresh initialisation or a checkpoint's weights, called on rank 0 alone) is
    broadcast shard by shard. The weights equal those of building the full model on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with on_meta():
        model = build()
    tied = [(m, name) for m in model.modules() for name, p in m.named_parameters(recurse=False)]
    owners: dict[int, tuple[nn.Module, str]] = {}
    ties: list[tuple[nn.Module, str, nn.Module, str]] = []
    for m, name in tied:  # remember which parameters are one tensor (GPT-2's tied head)
        p = getattr(m, name)
        if id(p) in owners:
            ties.append((m, name, *owners[id(p)]))
        else:
            owners[id(p)] = (m, name)
    model = wrap_model(model, "fsdp", env, reshard_after_forward, mixed_precision)
    model.to_empty(device=env.device)
    for m, name, owner, owner_name in ties:  # to_empty converts each module's reference on its own
        setattr(m, name, getattr(owner, owner_name))
    state = full_state() if env.is_main else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def is_last_micro_step(micro_step: int, grad_accum_steps: int) -> bool:
    """micro_step counts from 0 within one optimizer step."""
    return micro_step == grad_accum_steps - 1


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter while `enabled` (non-final micro-steps).

    Enter it around BOTH the forward and the backward pass: DDP decides in forward whether the coming
    backward will all-reduce, so a no_sync() entered only around backward still communicates (the bug
    that nanoGPT and build-nanogpt had).
    """
    if not enabled:
        yield
        return
    ddp = _find_ddp(model)
    if ddp is not None:
        with ddp.no_sync():
            yield
        return
    fsdp = _find_fsdp_root(model)
    if fsdp is not None:
        fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)
        return
    yield


# ----- optimizer -------------------------------------------------------------------------------------


def _resolve_param_groups(model: nn.Module, param_groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups whose "params" are tensors of `model` or their names (names survive FSDP's re-wrapping)."""
    named = dict(unwrap(model).named_parameters())
    by_id = {id(p): p for p in named.values()}
    groups = []
    for i, group in enumerate(param_groups):
        params = []
        for p in group["params"]:
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(f"param group {i}: the model has no parameter named {p!r}")
                p = named[p]
            elif id(p) not in by_id:
                raise ValueError(
                    f"param group {i}: holds a tensor that is not a parameter of the wrapped model "
                    "(build the parameter groups after wrap_model: FSDP replaces the parameters)"
                )
            params.append(p)
        groups.append({**group, "params": params})
    return groups


def build_optimizer(
    model: nn.Module,
    param_groups: Iterable[dict[str, Any]],
    strategy: str,
    env: DistEnv,
    **adamw_kwargs: Any,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; for `zero1` on several ranks, wrapped in ZeroRedundancyOptimizer
    so each rank keeps the AdamW state of only its share of the parameters."""
    _check_strategy(strategy)
    groups = _resolve_param_groups(model, param_groups)
    if strategy == "zero1" and env.distributed and env.world_size > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adamw_kwargs)
    if strategy == "fsdp" and env.distributed and env.world_size > 1 and adamw_kwargs.get("fused"):
        adamw_kwargs = {**adamw_kwargs, "fused": False, "foreach": True}  # fused kernels take no DTensors
    if strategy == "fsdp" and adamw_kwargs.get("foreach") and _mixes_dtensors(groups):
        # expert parallel under FSDP: sharded DTensor parameters next to the experts' plain tensors, which
        # one foreach kernel cannot take together; the per-tensor loop computes the same update
        adamw_kwargs = {**adamw_kwargs, "foreach": False}
    return torch.optim.AdamW(groups, **adamw_kwargs)


def _mixes_dtensors(groups: list[dict[str, Any]]) -> bool:
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for g in groups for p in g["params"]}
    return len(kinds) > 1


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping, the same on every rank.

    With FSDP each rank holds a shard of every gradient, so the norm is reduced over ranks."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


# ----- model state -----------------------------------------------------------------------------------


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict as CPU tensors, under the bare model's names, on rank 0.

    A collective under FSDP: every rank must call it; ranks other than 0 get an empty dict.
    """
    if _find_fsdp_root(model) is None:
        # DDP / single process: every rank already holds everything; no communication needed.
        if _pg_up() and dist.get_rank() != 0:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full (unsharded) state dict into a bare, DDP or FSDP model; every rank passes the full dict."""
    if _find_fsdp_root(model) is None:
        unwrap(model).load_state_dict(state_dict, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=strict))


# ----- optimizer state (torch.distributed.checkpoint) -------------------------------------------------


def _pg_up() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_dcp_quiet() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' whenever there is no process group: here that is
    what we mean, so the warning would only be noise to users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in unwrap(model).named_parameters()}


def _init_local_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors with a zero-gradient, zero-LR step (a no-op on the parameters),
    so a fresh optimizer has the shapes a checkpoint is loaded into."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        return
    saved_grads = [p.grad for p in params]
    saved_lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, saved_lrs):
            g["lr"] = lr
        for p, grad in zip(params, saved_grads):
            p.grad = grad


def _groups_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def _zero_local_state_dict(model: nn.Module, optimizer) -> dict[str, Any]:
    """This rank's share of a ZeroRedundancyOptimizer's state, in get_optimizer_state_dict's layout
    ({"state": {param name: {...}}, "param_groups": [... "params": [names]]}), so ZeRO-1, DDP and FSDP
    checkpoints are interchangeable. Each rank saves only the parameters it owns; DCP merges them."""
    names = _param_names(model)
    local = optimizer.optim
    state = {names[id(p)]: dict(local.state[p]) for g in local.param_groups for p in g["params"] if p in local.state}
    return {"state": state, "param_groups": _groups_by_name(optimizer, names)}


def save_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, path_dir: str | Path) -> None:
    """Write the optimizer state to `path_dir` with DCP (a collective: every rank calls it).

    The files hold global tensor shapes keyed by parameter name, so any world size and strategy can
    load them. Works without a process group too (one process writes everything)."""
    import torch.distributed.checkpoint as dcp

    if _is_zero(optimizer):
        osd = _zero_local_state_dict(model, optimizer)
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer)
    with _single_process_dcp_quiet():
        dcp.save({_OPTIM_KEY: osd}, checkpoint_id=str(path_dir), no_dist=not _pg_up())


def _apply_group_hyperparams(optimizer: torch.optim.Optimizer, loaded_groups: list[dict[str, Any]],
                             names: dict[int, str]) -> None:
    by_first = {g["params"][0]: g for g in loaded_groups if g["params"]}
    for group in optimizer.param_groups:
        src = by_first.get(names[id(group["params"][0])]) if group["params"] else None
        if src is None:
            raise UserError("optimizer checkpoint: its parameter groups do not match this model's")
        for k, v in src.items():
            if k != "params":
                group[k] = v


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, path_dir: str | Path) -> None:
    """Load what `save_optimizer_state` wrote, whatever world size and strategy wrote it (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path_dir = Path(path_dir)
    if not (path_dir / ".metadata").is_file():
        raise UserError(f"{path_dir}: not a complete optimizer checkpoint (no .metadata written)")
    try:
        if _is_zero(optimizer):
            local = optimizer.optim
            _init_local_state(local)
            template = _zero_local_state_dict(model, optimizer)
            with _single_process_dcp_quiet():
                dcp.load({_OPTIM_KEY: template}, checkpoint_id=str(path_dir), no_dist=not _pg_up())
            names = _param_names(model)
            for g in local.param_groups:
                for p in g["params"]:
                    if p in local.state:
                        local.state[p] = template["state"][names[id(p)]]
            # hyperparameters go to the outer groups; ZeroRedundancyOptimizer.step() copies them inward
            _apply_group_hyperparams(optimizer, template["param_groups"], names)
            return
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        template = get_optimizer_state_dict(model, optimizer)  # initialises the state with a no-op step
        with _single_process_dcp_quiet():
            dcp.load({_OPTIM_KEY: template}, checkpoint_id=str(path_dir), no_dist=not _pg_up())
        set_optimizer_state_dict(model, optimizer, template)
    except UserError:
        raise
    except (RuntimeError, KeyError, ValueError, CheckpointException) as e:
        raise UserError(f"{path_dir}: optimizer checkpoint does not fit this model/optimizer ({_cause(e)})") from e


def _cause(e: BaseException) -> str:
    """One line: DCP wraps each rank's error with its traceback; the last line is the reason."""
    if hasattr(e, "failures") and e.failures:  # CheckpointException
        e = next(iter(e.failures.values()))
        if isinstance(e, tuple):  # (exception, traceback frames)
            e = e[0]
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"
