"""Per-rank memory of ddp, zero1 and fsdp on 2 CPU processes (Gloo), with one process as reference.

    python benchmarks/distributed_memory.py [--preset gpt2] [--steps 3] [--batch-size 2] [--block-size 128]

For each strategy, 2 fresh processes (spawned, so no memory is inherited) build the preset's GPT-2, wrap
it, and take a few AdamW steps. Each rank reports:
- analytic bytes it holds: parameters, gradients (measured after backward) and AdamW state, counting
  only the local shard of sharded (DTensor) tensors, and ZeroRedundancyOptimizer's local state;
- RSS: before building the model (torch + the process group), the highest sampled after each step
  (training), and the process peak (`ru_maxrss`, which also covers the full model each rank builds
  before FSDP shards it).
Prints one JSON object; the ratios compare each strategy's per-rank parameter+gradient+optimizer bytes
and training-RSS growth with DDP's.

glibc's malloc raises its mmap threshold each time a large block is freed, after which blocks of a few
MB come from the heap and stay in RSS when freed: RSS then shows what the allocator kept, not what the
strategy holds (FSDP frees each gathered block right after use). The ranks therefore run with a fixed
MALLOC_MMAP_THRESHOLD_ (256 KiB) unless --glibc-default is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp

MB = 2**20


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer keeps the local AdamW in .optim
    return sum(_local_bytes(v) for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor))


def measure(strategy: str, env, args) -> dict:
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.train import distributed as D
    from gpt2kit.train.optim import param_groups

    baseline = _rss()
    torch.manual_seed(0)
    cfg = GPT2Config.from_preset(args.preset, dropout=0.0, attn_dropout=0.0)
    model = D.wrap_model(GPT2(cfg), strategy, env)
    opt = D.build_optimizer(model, param_groups(D.unwrap(model), 0.01), strategy, env, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(env.rank)
    train_rss, grad_bytes, step_s = 0, 0, []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.block_size + 1), generator=g)
        model(x[:, :-1], x[:, 1:]).loss.backward()
        grad_bytes = sum(_local_bytes(p.grad) for p in model.parameters())
        train_rss = max(train_rss, _rss())
        opt.step()
        train_rss = max(train_rss, _rss())
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    param_bytes = sum(_local_bytes(p) for p in model.parameters())
    optim_bytes = _optimizer_bytes(opt)
    return {
        "param_mb": param_bytes / MB,
        "grad_mb": grad_bytes / MB,
        "optimizer_mb": optim_bytes / MB,
        "param_grad_optimizer_mb": (param_bytes + grad_bytes + optim_bytes) / MB,
        "baseline_rss_mb": baseline / MB,
        "train_rss_mb": train_rss / MB,
        "train_rss_growth_mb": (train_rss - baseline) / MB,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,  # kB on Linux
        "median_step_s": sorted(step_s)[len(step_s) // 2],
    }


def worker(rank: int, world: int, port: int, strategy: str, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    from gpt2kit.train import distributed as D

    env = D.init_distributed("cpu", timeout_s=1800)
    result = measure(strategy, env, args)
    Path(out, f"{strategy}-{rank}.json").write_text(json.dumps(result))
    D.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2, help="per rank")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--strategies", default="none,ddp,zero1,fsdp")
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's adaptive mmap threshold")
    args = ap.parse_args()
    if not args.glibc_default:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(256 * 1024)  # read by glibc when each rank starts

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out:
        for strategy in args.strategies.split(","):
            world = 1 if strategy == "none" else 2
            print(f"{strategy}: {world} process(es)...", file=sys.stderr, flush=True)
            mp.start_processes(worker, args=(world, free_port(), strategy, args, out), nprocs=world,
                               join=True, start_method="spawn")
            results[strategy] = [json.loads(Path(out, f"{strategy}-{r}.json").read_text()) for r in range(world)]

    def mean(strategy: str, key: str) -> float:
        rows = results[strategy]
        return sum(r[key] for r in rows) / len(rows)

    ratios = {}
    if "ddp" in results:
        for s in results:
            ratios[s] = {
                "param_grad_optimizer_vs_ddp": mean(s, "param_grad_optimizer_mb") / mean("ddp", "param_grad_optimizer_mb"),
                "train_rss_growth_vs_ddp": mean(s, "train_rss_growth_mb") / mean("ddp", "train_rss_growth_mb"),
            }
    from gpt2kit.model import GPT2Config

    cfg = GPT2Config.from_preset(args.preset)
    n_params = 12 * cfg.n_layer * cfg.n_embd**2 + 13 * cfg.n_layer * cfg.n_embd + (
        cfg.vocab_size + cfg.n_ctx) * cfg.n_embd + 2 * cfg.n_embd
    print(json.dumps({
        "benchmark": "distributed_memory",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "torch": torch.__version__,
        "preset": args.preset,
        "parameters": n_params,
        "per_rank_batch": [args.batch_size, args.block_size],
        "steps": args.steps,
        "threads_per_rank": args.threads,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "glibc default (adaptive)"),
        "per_rank": results,
        "ratios": ratios,
    }, indent=2))


if __name__ == "__main__":
    main()
