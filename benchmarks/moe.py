"""Mixture-of-Experts and cross-layer sharing vs dense GPT-2, one run, fixed seeds. Prints JSON.

Character-level (bytes) tinyshakespeare: the first 90% trains, the last 10% validates. Every model sees the
same batches (same seed) for the same number of steps, so tokens seen are equal.

- MoE: dense vs E=8 top-1 (the same active parameters per token as dense: one 4C MLP per token) and E=8
  top-2 (two experts per token: twice the active FFN parameters, listed), plus top-1 with alpha=0 to show
  the imbalance the load-balancing loss removes. Load = the busiest expert's share of assignments over the
  mean share, averaged over the MoE layers, over the second half of training (after warm-up).
- Sharing: none / pairs / all at the same depth L (equal compute), and none at L/2 (the parameter count of
  pairs at L).
- tokens/s: training steps (forward + backward + AdamW) per wall second, timed after 5 warm-up steps.

  python benchmarks/moe.py [--input tinyshakespeare.txt] [--steps 250] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2Network
from gpt2kit.model.moe import read_moe_metrics

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = Path(os.environ.get("GPT2KIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare.txt"


def load_bytes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.is_file():
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    else:  # the built-in corpus: this interpreter's standard library sources
        from gpt2kit.data import default_corpus

        text = "".join(d for _, d in zip(range(300), default_corpus()))
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    cut = int(0.9 * len(data))
    return data[:cut].astype(np.int64), data[cut:].astype(np.int64)


def batches(data: np.ndarray, steps: int, batch: int, block: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - block - 1, batch)
        x = np.stack([data[s : s + block] for s in starts])
        y = np.stack([data[s + 1 : s + block + 1] for s in starts])
        yield torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def val_loss(model: GPT2Network, data: np.ndarray, block: int, max_windows: int = 256) -> float:
    model.eval()
    n = min((len(data) - 1) // block, max_windows)
    x = torch.from_numpy(data[: n * block].reshape(n, block))
    y = torch.from_numpy(data[1 : n * block + 1].reshape(n, block))
    total = sum(float(model(x[i : i + 32], targets=y[i : i + 32]).loss) * len(x[i : i + 32]) for i in range(0, n, 32))
    model.train()
    return total / n


def active_params(model: GPT2Network) -> int:
    """Parameters a token passes through (each MoE layer: router + top_k experts); shared blocks counted per use."""
    c = model.config
    per_block = []
    for block in model.transformer.h:
        n = sum(p.numel() for p in block.parameters())
        mlp = block.mlp
        if hasattr(mlp, "experts"):
            one = sum(p.numel() for p in mlp.experts[0].parameters())
            n -= one * (mlp.num_experts - mlp.top_k)
        per_block.append(n)
    body = sum(per_block[b] for b in model.block_schedule)
    return body + c.vocab_size * c.n_embd + c.n_ctx * c.n_embd + 2 * c.n_embd


def train(name: str, cfg: GPT2Config, train_data, val_data, args) -> dict:
    torch.manual_seed(args.seed)
    model = GPT2Network(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    busiest, drops, t_timed, timed_steps = [], [], 0.0, 0
    for step, (x, y) in enumerate(batches(train_data, args.steps, args.batch, args.block, args.seed)):
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        out = model(x, targets=y)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 5:
            t_timed += time.perf_counter() - t0
            timed_steps += 1
        m = read_moe_metrics(model)
        if m and step >= args.steps // 2:
            busiest.append(sum(max(load) * len(load) for load in m["moe_load"]) / len(m["moe_load"]))
            drops.append(m["moe_dropped"])
    row = {
        "name": name,
        "params": model.num_params(),
        "active_params_per_token": active_params(model),
        "val_loss": round(val_loss(model, val_data, args.block), 4),
        "tokens_per_s": round(timed_steps * args.batch * args.block / max(t_timed, 1e-9), 1),
    }
    if busiest:
        row["busiest_over_mean"] = round(sum(busiest) / len(busiest), 3)
        row["dropped_share"] = round(sum(drops) / len(drops), 4)
    print(json.dumps(row), flush=True)
    return row


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": platform.processor() or platform.machine(), "avx2": " avx2" in flags,
            "avx512f": " avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "uptime": load,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on a shared 2-core box ran 10x slower
    ap.add_argument("--only", choices=["moe", "share"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_data, val_data = load_bytes(args.input)
    base = dict(vocab_size=256, n_ctx=args.block, n_layer=args.layers, n_head=4, n_embd=args.embd, dropout=0.0,
                attn_dropout=0.0, eos_token_id=0)
    out: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.only != "share":
        runs = {
            "dense": {},
            "moe_e8_top1": dict(moe_experts=8, moe_top_k=1),
            "moe_e8_top2": dict(moe_experts=8, moe_top_k=2),
            "moe_e8_top1_alpha0": dict(moe_experts=8, moe_top_k=1, moe_aux_loss_coef=0.0),
        }
        rows = {n: train(n, GPT2Config(**(base | kw)), train_data, val_data, args) for n, kw in runs.items()}
        dense = rows["dense"]
        for r in rows.values():
            r["val_loss_minus_dense"] = round(r["val_loss"] - dense["val_loss"], 4)
            r["speed_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
        out["moe"] = list(rows.values())
    if args.only != "moe":
        runs = {
            f"none_L{args.layers}": dict(share_layers="none"),
            f"pairs_L{args.layers}": dict(share_layers="pairs"),
            f"all_L{args.layers}": dict(share_layers="all"),
            f"none_L{args.layers // 2}": dict(share_layers="none", n_layer=args.layers // 2),
        }
        out["share"] = [train(n, GPT2Config(**(base | kw)), train_data, val_data, args) for n, kw in runs.items()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
