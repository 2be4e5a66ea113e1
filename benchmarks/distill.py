"""Distillation vs training from scratch: the same student, data, seed and number of steps.

  python benchmarks/distill.py --teacher RUN/step-000400 --data SHARDS --steps 200

Student: --n-layer/--n-head/--n-embd (default L2 H2 d64) with the teacher's vocabulary and context.
Both runs use gpt2kit's trainer with identical settings; the distilled one optimises
alpha * CE + (1 - alpha) * tau^2 * KL(teacher || student). Reported: validation loss of both students
(whole val split, plain CE) and of the teacher, wall time. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gpt2kit.data import read_meta
    from gpt2kit.model import GPT2
    from gpt2kit.post.distill import distill
    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import evaluate, train

    teacher = GPT2.from_pretrained(args.teacher)
    meta = read_meta(args.data)
    common = dict(preset="gpt2-tiny", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                  n_ctx=teacher.config.n_ctx, block_size=args.block_size, batch_size=args.batch_size,
                  max_steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20), eval_every=0,
                  save_every=0, seed=args.seed, progress=False, device="cpu", threads=args.threads)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "teacher": str(args.teacher), "teacher_params": sum(p.numel() for p in teacher.parameters()),
           "student": {k: common[k] for k in ("n_layer", "n_head", "n_embd")}, "steps": args.steps,
           "alpha": args.alpha, "temperature": args.temperature}
    out["teacher_val_loss"] = evaluate(teacher, args.data, meta, args.batch_size, args.block_size,
                                       torch.device("cpu"))["val_loss"]
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        d = distill(args.teacher, "gpt2-tiny", args.data, Path(work) / "distilled", alpha=args.alpha,
                    tau=args.temperature, overrides=common)
        out["distilled"] = {"val_loss": d.val["val_loss"], "wall_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        s = train(build_config({**common, "data": str(args.data), "out": str(Path(work) / "scratch")}))
        out["scratch"] = {"val_loss": s.val["val_loss"], "wall_s": time.perf_counter() - t0}
        out["student_params"] = sum(p.numel() for p in GPT2.from_pretrained(d.last_checkpoint).parameters())
    out["val_loss_gain"] = out["scratch"]["val_loss"] - out["distilled"]["val_loss"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
