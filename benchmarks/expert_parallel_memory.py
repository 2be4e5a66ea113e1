"""Per-rank bytes of an MoE GPT-2 under expert parallelism vs replicated experts, 2 CPU processes (Gloo).

    python benchmarks/expert_parallel_memory.py [--experts 8] [--n-layer 4] [--n-embd 128] [--steps 2]

Two fresh spawned ranks build the same MoE model (seed 0), take a few AdamW steps on random tokens and
report the bytes each holds in parameters, gradients and AdamW state, split into expert tensors
(`...mlp.experts.{e}...`) and the rest ("dense": attention, router, embeddings, LayerNorms):
- `replicated`: plain DDP, every rank holds every expert. This is what `--expert-parallel` held before
  the experts were sharded (its weights, gradients and AdamW state were those of DDP; only the compute was
  split), so it is the "before" column.
- `sharded`: `shard_experts` + DDP, as `gpt2kit train --expert-parallel` does now: E/W experts per rank.
Prints one JSON object with both and their ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

MB = 2**20


def measure(mode: str, env, args) -> dict:
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.train import distributed as D
    from gpt2kit.train.expert_parallel import expert_bytes, shard_experts
    from gpt2kit.train.optim import param_groups

    torch.manual_seed(0)
    cfg = GPT2Config.from_preset("gpt2-tiny", n_layer=args.n_layer, n_embd=args.n_embd, n_head=4, n_ctx=128,
                                 vocab_size=args.vocab, eos_token_id=0, dropout=0.0, attn_dropout=0.0,
                                 moe_experts=args.experts, moe_top_k=2)
    model = GPT2(cfg)
    shards = shard_experts(model, env.rank, env.world_size, "ddp") if mode == "sharded" else None
    wrapped = D.wrap_model(model, "ddp", env)
    opt = D.build_optimizer(wrapped, param_groups(model, 0.01), "ddp", env, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(env.rank)
    grads = {"expert_grads": 0, "dense_grads": 0}
    for _ in range(args.steps):
        x = torch.randint(0, cfg.vocab_size, (2, 65), generator=g)
        out = wrapped(x[:, :-1], targets=x[:, 1:])
        (out.loss + out.aux_loss).backward()
        grads = {"expert_grads": 0, "dense_grads": 0}
        for name, p in model.named_parameters():
            if p.grad is not None:
                grads["expert_grads" if ".experts." in name else "dense_grads"] += p.grad.numel() * p.grad.element_size()
        if shards is not None:
            shards.clip_grad_norm_(1.0)
        else:
            D.clip_grad_norm_(wrapped, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sizes = {**expert_bytes(wrapped, opt), **grads}
    return {k: v / MB for k, v in sizes.items()}


def worker(rank: int, world: int, port: int, mode: str, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gpt2kit.train import distributed as D

    env = D.init_distributed("cpu", timeout_s=1800)
    Path(out, f"{mode}-{rank}.json").write_text(json.dumps(measure(mode, env, args)))
    D.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    world = 2
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out:
        for mode in ("replicated", "sharded"):
            print(f"{mode}: {world} processes...", file=sys.stderr, flush=True)
            mp.start_processes(worker, args=(world, free_port(), mode, args, out), nprocs=world, join=True,
                               start_method="spawn")
            results[mode] = [json.loads(Path(out, f"{mode}-{r}.json").read_text()) for r in range(world)]
    keys = results["sharded"][0].keys()
    ratios = {k: results["sharded"][0][k] / results["replicated"][0][k] for k in keys if results["replicated"][0][k]}
    print(json.dumps({
        "benchmark": "expert_parallel_memory",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab": args.vocab, "experts": args.experts,
                  "top_k": 2, "world_size": world},
        "per_rank_mb": results,
        "sharded_over_replicated_rank0": ratios,
    }, indent=2))


if __name__ == "__main__":
    main()
