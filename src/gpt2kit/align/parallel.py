"""Data parallel for the batch trainers (DPO, reward model) under `torchrun`, on pre-training's process group.

`torchrun --nproc_per_node=N -m gpt2kit dpo ...` starts N processes; each holds the whole model and its
AdamW state (the models here are small: no sharding), takes its contiguous share of every global batch,
and the gradients are averaged over ranks before the step (one all-reduce of one flat buffer). Each rank's
loss is the mean over its B / N rows, so the averaged gradient is the gradient of the mean over all B rows:
the run equals one process with the same global batch (up to float summation order; tested to 1e-6).
Logged metrics (batch means) are averaged the same way. Rank 0 alone writes checkpoints and OUT; a stop
request (Ctrl-C / SIGTERM on any rank) is agreed on by all ranks after the step. The data, the reference
log-probs and the held-out evaluation are computed by every rank alike (cheap next to training; no
gathering needed). Without torchrun everything here is the identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..train.distributed import DistEnv, any_rank, barrier, cleanup, init_distributed


def join() -> DistEnv:
    """This process's place in a torchrun job (Gloo on the CPU), or a single process without torchrun."""
    return init_distributed("cpu")


@contextmanager
def job() -> Iterator[DistEnv]:
    """join(), and leave the process group at the end (safe without torchrun)."""
    env = join()
    try:
        yield env
    finally:
        if env.distributed:
            cleanup()


def check_batch(batch_size: int, env: DistEnv) -> None:
    if batch_size % env.world_size:
        raise UserError(f"--batch-size {batch_size} is not a multiple of the {env.world_size} processes: every "
                        "rank takes an equal share of the global batch")


def shard(rows: list[int], env: DistEnv) -> list[int]:
    """This rank's contiguous share of a global batch (check_batch made the shares equal)."""
    n = len(rows) // env.world_size
    return rows[env.rank * n:(env.rank + 1) * n]


def average_gradients(module: torch.nn.Module, env: DistEnv) -> None:
    """Replace every gradient by its mean over ranks (one all-reduce of a flat buffer)."""
    if env.world_size < 2:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= env.world_size
    at = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[at:at + n].view_as(p).clone()
        at += n


def token_weighted(loss: torch.Tensor, n_tokens: torch.Tensor, env: DistEnv) -> tuple[torch.Tensor, float]:
    """For a loss that is a mean over target tokens (shares hold different numbers of them): (the loss to
    backward on this rank so that average_gradients gives the gradient of the mean over all the global
    batch's tokens, that global mean's value)."""
    if env.world_size < 2:
        return loss, loss.item()
    n = n_tokens.detach().double()
    t = torch.stack([loss.detach().double() * n, n])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return loss * float(n * env.world_size / t[1]), float(t[0] / t[1])


def mean_metrics(row: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Batch-mean metrics of this rank's shard -> the global batch's (equal shards: the mean of the means)."""
    if env.world_size < 2 or not row:
        return row
    keys = list(row)  # the row's own order: metrics.jsonl lines read the same as one process's
    t = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist())}


def agree_stop(requested: str | None, env: DistEnv) -> str | None:
    """A stop request on any rank stops every rank after the same step."""
    if env.world_size < 2:
        return requested
    return (requested or "SIGTERM") if any_rank(requested is not None, env) else None


def main_only(env: DistEnv, fn, *args, **kwargs):
    """Run `fn` on rank 0 only, then wait for it on every rank."""
    out = fn(*args, **kwargs) if env.is_main else None
    barrier(env)
    return out


def refuse_world(env: DistEnv, what: str) -> None:
    if env.world_size > 1:
        raise UserError(f"{what} runs in one process; under torchrun start it with --nproc_per_node=1 "
                        f"(got WORLD_SIZE={env.world_size})")
