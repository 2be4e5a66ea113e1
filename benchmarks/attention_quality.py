"""Attention variants vs dense at equal steps on tinyshakespeare: validation bits per character. Prints JSON.

    python benchmarks/attention_quality.py [--T 256] [--steps 100] [--threads 1]

The same data as benchmarks/train_shakespeare.py (BPE 1024 learned on the first 90% of the characters,
the last 10% validate), a 4-layer d=128 model with n_ctx = block = T, batch 4, lr 1e-3 cosine, the same
seed for every variant: dense, sliding (window T/4), fixed (block T/4, one summary column: the train flags
set no other), a hybrid (three sliding layers, the last one dense) and linear. Validation covers --eval-batches x 8 windows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shakespeare import DEFAULT_INPUT, write_shards  # noqa: E402


def variants(T: int) -> dict[str, dict]:
    w = T // 4
    return {
        "dense": {},
        "sliding": {"attention": "sliding", "window": w},
        "fixed": {"attention": "fixed", "block": w},
        "hybrid": {"attention_layers": "sliding,sliding,sliding,dense", "window": w},
        "linear": {"attention": "linear"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(DEFAULT_INPUT))
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args()

    import torch

    from gpt2kit.tokenizer import Tokenizer
    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    text = Path(args.input).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    work = Path(tempfile.mkdtemp(prefix="attn-quality-"))
    tok = Tokenizer.train([text[:cut]], 1024, progress=False)
    write_shards(work / "shards", tok, text[:cut], text[cut:])
    rows = {}
    for name, flags in variants(args.T).items():
        if args.only and name not in args.only.split(","):
            continue
        cfg = build_config({
            "data": str(work / "shards"), "out": str(work / name), "preset": "gpt2-mini", "n_layer": 4,
            "n_head": 4, "n_embd": 128, "n_ctx": args.T, "block_size": args.T, "dropout": 0.0,
            "attn_dropout": 0.0, "batch_size": args.batch_size, "max_steps": args.steps, "lr": 1e-3,
            "min_lr": 1e-4, "warmup_steps": 10, "schedule": "cosine", "beta2": 0.99, "grad_clip": 1.0,
            "eval_every": 0, "save_every": 0, "log_every": 10 ** 6, "seed": 1337, "device": "cpu",
            "progress": False, "eval_batches": args.eval_batches, "eval_batch_size": 8, **flags,
        })
        t0 = time.perf_counter()
        trainer = Trainer(cfg, overwrite=True, log=lambda message: None)
        result = trainer.fit()
        trainer.close()
        rows[name] = {"val_bpc": result.val["val_bpc"], "val_loss": result.val["val_loss"],
                      "wall_s": time.perf_counter() - t0, "flags": flags}
        print(json.dumps({name: rows[name]}), file=sys.stderr, flush=True)
    dense = rows.get("dense", {}).get("val_bpc")
    for r in rows.values():
        if dense:
            r["bpc_vs_dense"] = r["val_bpc"] / dense
    print(json.dumps({"benchmark": "attention_quality", "T": args.T, "steps": args.steps,
                      "batch_size": args.batch_size, "model": "L4 H4 d128, BPE 1024", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
