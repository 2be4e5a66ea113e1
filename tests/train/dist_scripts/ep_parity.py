"""Expert-parallel MoE training on 2 Gloo ranks vs one process (tests/train/test_expert_parallel.py).

    python ep_parity.py OUT_DIR [ddp|fsdp]

One process trains a tiny MoE GPT-2 (E=4, top-2, capacity factor 1.0, so tokens are dropped) for 10 AdamW
steps (gradient norm clipped at 0.5), each step's global batch as 2 micro-batches (the trainer's
forward_backward); then 2 ranks train the same steps with the experts sharded (2 per rank) and the rest
under DDP (default) or FSDP2 (the dense part sharded, the experts left to the all-to-all), each rank one
half of the batch. Both write their final parameters (the ranks' gathered on rank 0) to OUT_DIR/<name>.pt
(name: single, ep2 under DDP, ep2_fsdp) and each rank its parameter / AdamW bytes to
OUT_DIR/<name>.rank<r>.sizes.pt. This script asserts nothing.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.train import distributed as D
from gpt2kit.train.expert_parallel import expert_bytes, shard_experts
from gpt2kit.train.trainer import forward_backward

STEPS = 10
B, T = 2, 16  # per rank


class Batch:
    def __init__(self, rows: torch.Tensor):
        self.idx, self.targets, self.loss_mask = rows[:, :-1], rows[:, 1:], None


def config() -> GPT2Config:
    return GPT2Config.from_preset("gpt2-tiny", vocab_size=97, eos_token_id=96, n_ctx=32, dropout=0.0,
                                  attn_dropout=0.0, moe_experts=4, moe_top_k=2, moe_capacity_factor=1.0)


def run(env: D.DistEnv, out: Path, name: str, strategy: str = "ddp") -> None:
    torch.manual_seed(0)
    model = GPT2(config()).to(torch.float64).train()
    shards = shard_experts(model, env.rank, env.world_size, strategy) if env.world_size > 1 else None
    wrapped = D.wrap_model(model, strategy if env.world_size > 1 else "none", env,
                           ignored_params=shards.ignored_params if shards is not None else None)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1234)
    sync = (lambda skip: D.no_grad_sync(wrapped, skip)) if env.world_size > 1 else None
    for _ in range(STEPS):
        rows = torch.randint(0, 97, (2 * B, T + 1), generator=g)
        halves = [Batch(rows[:B]), Batch(rows[B:])]
        micro = halves if env.world_size == 1 else [halves[env.rank]]
        forward_backward(wrapped, micro, sync=sync, env=env)
        norm = shards.clip_grad_norm_(0.5) if shards is not None else D.clip_grad_norm_(wrapped, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = shards.gather_state_dict(wrapped) if shards is not None else model.state_dict()
    sizes = expert_bytes(wrapped, opt)
    if env.is_main:
        torch.save(state, out / f"{name}.pt")
    # every rank: what it holds (the test checks 1/W of the experts), and the last step's clipped norm
    torch.save({**sizes, "norm": float(norm)}, out / f"{name}.rank{env.rank}.sizes.pt")


def worker(rank: int, port: int, out: Path, strategy: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.init_distributed("cpu", timeout_s=120)
    run(env, out, "ep2" if strategy == "ddp" else f"ep2_{strategy}", strategy)
    D.cleanup()


def main(out: Path, strategy: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    run(D.init_distributed("cpu"), out, "single")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(port, out, strategy), nprocs=2, join=True, start_method="fork")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
