"""Runs the CPU/Gloo data-parallel scenarios that tests/train/test_distributed_parity.py checks.

    python dist_parity.py OUT_DIR

The parent process trains the single-process reference (global batch 2B, no process group) and saves a
checkpoint at the half-way step; then it starts 2 ranks that train the same 20 steps with ddp, ddp with
gradient accumulation, fsdp (ZeRO-3), fsdp with parameters kept after forward (ZeRO-2 style) plus
accumulation, and zero1, each with per-rank batch B; fsdp and zero1 save a checkpoint half-way; an fsdp
run resumes from the single-process checkpoint and a zero1 run from the fsdp one. Back in one process,
runs resume from the fsdp and zero1 checkpoints. Every run's final parameters go to OUT_DIR/<name>.pt
(full state dicts, CPU), and collective counts per micro-step to OUT_DIR/comm.json. The test compares
them; this script asserts nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from gpt2kit.model import GPT2, GPT2Config
from gpt2kit.train import distributed as D

STEPS = 20
SAVE_AT = 10  # checkpoint after this many optimizer steps
GLOBAL_BATCH = 4  # 2 ranks x B=2
T = 16
LR = 3e-3
# float64: the comparison then shows the algorithm (loss scaling, reduction, sharding, resume) and not
# float32 rounding, which AdamW amplifies in parameters whose true gradient is zero (the attention key
# bias: adding a constant to all scores of a row does not change the softmax), up to ~1e-4 after 20 steps.
# The *_fp32 runs repeat the three strategies in float32, the dtype training uses.
DTYPE = torch.float64


def model_config() -> GPT2Config:
    # 257 tokens: an odd vocabulary, so FSDP's dim-0 shards of the tied embedding are uneven.
    return GPT2Config.from_preset(
        "gpt2-tiny", vocab_size=257, eos_token_id=256, n_ctx=64, dropout=0.0, attn_dropout=0.0
    )


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 257, (GLOBAL_BATCH, T + 1), generator=g) for _ in range(STEPS)]


def param_groups(model: torch.nn.Module) -> list[dict]:
    named = list(D.unwrap(model).named_parameters())
    decay = [n for n, p in named if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
    rest = [n for n, p in named if n not in decay]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def build(strategy: str, env: D.DistEnv, reshard_after_forward: bool = True, load_dir: Path | None = None,
          dtype: torch.dtype = DTYPE):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT2(model_config()) if load_dir is None else GPT2.from_pretrained(load_dir)
    model = model.to(dtype)
    model = D.wrap_model(model, strategy, env, reshard_after_forward=reshard_after_forward)
    opt = D.build_optimizer(model, param_groups(model), strategy, env, lr=LR, betas=(0.9, 0.95))
    if load_dir is not None:
        D.load_optimizer_state(model, opt, load_dir / "optimizer")
    return model, opt


def save(model, opt, env: D.DistEnv, out: Path) -> None:
    """The trainer's checkpoint in miniature: rank 0 writes the gathered model, all ranks the DCP optimizer."""
    sd = D.gather_full_state_dict(model)
    if env.is_main:
        plain = GPT2(model_config()).to(DTYPE)
        plain.load_state_dict(sd)
        plain.save_pretrained(out)
    D.save_optimizer_state(model, opt, out / "optimizer")
    D.barrier(env)


def train(model, opt, env: D.DistEnv, steps: range, accum: int = 1, save_dir: Path | None = None):
    data = batches()
    per_rank = GLOBAL_BATCH // env.world_size
    for step in steps:
        rows = data[step][env.rank * per_rank : (env.rank + 1) * per_rank]
        for micro, chunk in enumerate(rows.chunk(accum)):
            with D.no_grad_sync(model, enabled=not D.is_last_micro_step(micro, accum)):
                loss = model(chunk[:, :-1], chunk[:, 1:]).loss / accum
                loss.backward()
        D.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if save_dir is not None and step + 1 == SAVE_AT:
            save(model, opt, env, save_dir)


def _log(msg: str) -> None:
    """Progress on stdout, which the test shows when this script fails or times out."""
    print(f"{time.strftime('%H:%M:%S')} rank {os.environ.get('RANK', '-')}: {msg}", flush=True)


def run(name: str, out: Path, env: D.DistEnv, strategy: str, *, accum: int = 1, reshard_after_forward=True,
        save_dir: Path | None = None, resume_from: Path | None = None, dtype: torch.dtype = DTYPE) -> None:
    _log(name)
    model, opt = build(strategy, env, reshard_after_forward, load_dir=resume_from, dtype=dtype)
    start = SAVE_AT if resume_from is not None else 0
    train(model, opt, env, range(start, STEPS), accum=accum, save_dir=save_dir)
    sd = D.gather_full_state_dict(model)
    if env.is_main:
        torch.save(sd, out / f"{name}.pt")


# ----- collective counts ---------------------------------------------------------------------------


def count_collectives(env: D.DistEnv, strategy: str, accum: int, wrong_order: bool = False) -> list[list[int]]:
    """Collectives issued in each micro-step of 2 optimizer steps (after one warm-up step, so DDP's
    bucket rebuild after its first iteration does not show). DDP: all-reduce buckets (comm hook);
    FSDP: reduce-scatters. wrong_order=True enters no_grad_sync around backward only."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model, opt = build(strategy, env)
    counter = {"n": 0}
    if strategy == "ddp":

        def hook(state, bucket):
            state["n"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        model.register_comm_hook(counter, hook)
        patched = contextlib.nullcontext()
    else:
        real = torch.distributed.reduce_scatter_single

        def counting_reduce_scatter(*args, **kwargs):
            counter["n"] += 1
            return real(*args, **kwargs)

        patched = _patched(torch.distributed, "reduce_scatter_single", counting_reduce_scatter)

    data = batches()
    per_rank = GLOBAL_BATCH // env.world_size
    counts = []
    with patched:
        for step in range(3):
            rows = data[step][env.rank * per_rank : (env.rank + 1) * per_rank]
            micro_batches = rows.repeat(accum, 1).chunk(accum) if step else [rows]  # warm-up: one micro-step
            per_micro = []
            for micro, chunk in enumerate(micro_batches):
                skip = not D.is_last_micro_step(micro, len(micro_batches))
                before = counter["n"]
                if wrong_order:
                    loss = model(chunk[:, :-1], chunk[:, 1:]).loss
                    with D.no_grad_sync(model, enabled=skip):
                        loss.backward()
                else:
                    with D.no_grad_sync(model, enabled=skip):
                        model(chunk[:, :-1], chunk[:, 1:]).loss.backward()
                per_micro.append(counter["n"] - before)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                counts.append(per_micro)
    return counts


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ----- processes -----------------------------------------------------------------------------------


def worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.init_distributed("cpu", timeout_s=120)
    assert env.world_size == 2 and env.backend == "gloo"
    run("ddp", out, env, "ddp")
    run("ddp_accum2", out, env, "ddp", accum=2)
    run("fsdp", out, env, "fsdp", save_dir=out / "ckpt_fsdp")
    run("fsdp_keep_accum2", out, env, "fsdp", accum=2, reshard_after_forward=False)
    run("zero1", out, env, "zero1", save_dir=out / "ckpt_zero1")
    run("fsdp_from_single", out, env, "fsdp", resume_from=out / "ckpt_single")
    run("zero1_from_fsdp", out, env, "zero1", resume_from=out / "ckpt_fsdp")
    for strategy in ("ddp", "fsdp", "zero1"):
        run(f"{strategy}_fp32", out, env, strategy, dtype=torch.float32)
    _log("counting collectives")
    comm = {
        "ddp_accum1": count_collectives(env, "ddp", 1),
        "ddp_accum4": count_collectives(env, "ddp", 4),
        "ddp_accum4_sync_toggled_after_forward": count_collectives(env, "ddp", 4, wrong_order=True),
        "fsdp_accum1": count_collectives(env, "fsdp", 1),
        "fsdp_accum4": count_collectives(env, "fsdp", 4),
    }
    if env.is_main:
        (out / "comm.json").write_text(json.dumps(comm))
    D.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    single = D.init_distributed("cpu")
    assert not single.distributed
    torch.manual_seed(0)
    torch.save(GPT2(model_config()).to(DTYPE).state_dict(), out / "init.pt")
    run("single", out, single, "none", save_dir=out / "ckpt_single")
    run("single_fp32", out, single, "none", dtype=torch.float32)
    _log("starting 2 ranks")
    # fork: the ranks inherit the imported torch (and the torch._dynamo that the first optimizer step
    # imports), which saves ~10 s per rank on a busy 2-core machine compared with spawn.
    mp.start_processes(worker, args=(free_port(), out), nprocs=2, join=True, start_method="fork")
    run("single_from_fsdp", out, single, "none", resume_from=out / "ckpt_fsdp")
    run("single_from_zero1", out, single, "none", resume_from=out / "ckpt_zero1")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
