"""Trainer step vs bare model step at the `gpt2` preset (124M), float32 CPU: the trainer's overhead.

bare:    loss = model(idx, targets).loss; loss.backward(); AdamW(fused).step(); zero_grad()
trainer: Trainer.train_step(): LR schedule, a batch from the shard loader, token-weighted loss,
         gradient clipping (global norm), the non-finite check, AdamW(fused).step()

Both run on the same model and optimizer, interleaved (bare, trainer, bare, ...) after a warm-up, so
machine noise hits both alike; medians of wall and CPU seconds are reported. `--compile` runs the same with torch.compile.
Prints JSON.

  python benchmarks/train_step.py [--batch 4 --block 256 --rounds 5] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_shards(directory: Path, vocab: int = 50257, n_tokens: int = 400_000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", 20_000)):
        rng.integers(0, vocab - 1, size=n, dtype=np.uint16).tofile(directory / f"{split}.bin")
    splits = {s: {"documents": 1, "tokens": n, "characters": 4 * n, "bytes": 4 * n}
              for s, n in (("train", n_tokens), ("val", 20_000))}
    meta = {"format": 1, "dtype": "uint16", "vocab_size": vocab, "eos_id": vocab - 1,
            "tokenizer_fingerprint": "synthetic", "tokenizer": "", "splits": splits}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()

    import torch

    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="train-step-"))
    data = synthetic_shards(work / "shards")
    cfg = build_config({
        "data": str(data), "out": str(work / "run"), "preset": args.preset, "dropout": 0.0, "attn_dropout": 0.0,
        "block_size": args.block, "batch_size": args.batch, "max_steps": 1000, "warmup_steps": 10,
        "device": "cpu", "progress": False, "compile": args.compile, "dtype": args.dtype,
    })
    trainer = Trainer(cfg, overwrite=True)
    model, opt, loader = trainer.step_model, trainer.optimizer, trainer.loader
    autocast = trainer.autocast

    def bare_step(batch) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        with autocast():
            loss = model(batch.idx, targets=batch.targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, time.process_time() - c

    def trainer_step() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        batches = [loader.next_batch() for _ in range(cfg.optim.grad_accum)]
        trainer.train_step(batches)
        trainer.step += 1
        return time.perf_counter() - t, time.process_time() - c

    fixed = loader.next_batch()
    # warm-up: allocations (and compilation) for both paths
    bare_step(fixed)
    trainer_step()
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_step(fixed))
        ours.append(trainer_step())
    tokens = args.batch * args.block
    mb, mt = statistics.median(w for w, _ in bare), statistics.median(w for w, _ in ours)
    cb, ct = statistics.median(c for _, c in bare), statistics.median(c for _, c in ours)
    out = {
        "benchmark": "train_step",
        "preset": args.preset,
        "params": trainer.bare.num_params(),
        "batch_x_block": f"{args.batch}x{args.block}",
        "dtype": args.dtype,
        "compile": args.compile,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "bare_step_s_median": mb,
        "trainer_step_s_median": mt,
        "bare_tokens_per_s": tokens / mb,
        "trainer_tokens_per_s": tokens / mt,
        "trainer_overhead": mt / mb - 1.0,
        # CPU seconds (all threads) per step: robust to other processes competing for the cores
        "bare_step_cpu_s_median": cb,
        "trainer_step_cpu_s_median": ct,
        "trainer_overhead_cpu": ct / cb - 1.0,
        "bare_steps_wall_cpu_s": bare,
        "trainer_steps_wall_cpu_s": ours,
    }
    trainer.close()
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
