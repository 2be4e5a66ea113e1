"""Mixture-of-Experts and cross-layer sharing vs dense GPT-2, fixed seeds. Prints JSON (one line per run).

Character-level (bytes; or `--bpe-vocab N`: a byte-level BPE learned on the train split) tinyshakespeare
(1.1 MB: 3000 steps of 16 x 64 bytes see it ~3 times), or with
`--input builtin` the main job's corpus (the standard library sources, ~10 MB: seen once, less than
that): the first 90% trains, the last 10% validates (every non-overlapping window of the val split). Every model sees the same batches (same seed)
for the same number of steps, so tokens seen are equal.

- MoE, at equal active parameters per token: dense (one 4C MLP per token) vs E=8 top-1 (Switch: one 4C
  expert per token) and E=8 top-2 with experts of hidden width 2C (two half-width experts per token: the
  FFN parameters a token passes through equal one 4C MLP's, only the router's E x C are extra), plus
  top-1 with alpha=0 to show the imbalance the load-balancing loss removes.
- Load: per training step and MoE layer, the busiest expert's share of the step's assignments (every
  token's choices, counted before capacity drops anything) times E; averaged over layers and over the
  steps of the second half of training (well after warm-up). `busiest_over_mean_window` is the same from
  the counts summed over that whole window.
- Sharing: none / pairs / all at the same depth L (equal compute), and none at L/2 (the parameter count
  of pairs at L).
- Optimizer: Muon for the hidden matrices (every expert's on its own) + AdamW for embeddings, gains,
  biases and routers (train/muon.py), or AdamW alone; linear warm-up then cosine to 10%.
- tokens/s: training steps (forward + backward + optimizer) per wall second, timed after 5 warm-up steps.
  The quality runs report it too, but for the speed comparison use `--speed-steps N` (under the bench
  lock): the selected models are built together and timed step by step in turn on the same batches.

  python benchmarks/moe.py [--input tinyshakespeare.txt] [--steps 3000] [--runs dense,moe_e8_top1,...]
  flock /tmp/gpt2kit-bench.lock python benchmarks/moe.py --speed-steps 60 --runs dense,moe_e8_top1,moe_e8_top2_half
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from gpt2kit.model.config import GPT2Config
from gpt2kit.model.gpt2 import GPT2Network
from gpt2kit.model.moe import moe_layers, read_moe_metrics
from gpt2kit.train.muon import Muon, muon_param_groups
from gpt2kit.train.optim import build_optimizer, cosine_lr, set_lr

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = Path(os.environ.get("GPT2KIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare.txt"


def load_bytes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.is_file():
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    else:  # `--input builtin`: the main job's corpus (this interpreter's standard library sources, ~10 MB)
        from gpt2kit.train.main_job import corpus_files

        text = "\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in corpus_files())
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    cut = int(0.9 * len(data))
    return data[:cut].astype(np.int64), data[cut:].astype(np.int64)


def bpe_tokens(train_bytes: np.ndarray, val_bytes: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Re-express both splits in a byte-level BPE of `vocab_size` ids learned on the train split only
    (gpt2kit's own learner, deterministic); also returns the val split's bytes per token, which turns a
    per-token loss into nats per byte."""
    from gpt2kit.tokenizer import Tokenizer

    def text(b: np.ndarray) -> str:
        return b.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    train_text, val_text = text(train_bytes), text(val_bytes)
    tok = Tokenizer.train([train_text], vocab_size, special_tokens=(), progress=False)
    train_ids = np.asarray(tok.encode_ordinary(train_text), dtype=np.int64)
    val_ids = np.asarray(tok.encode_ordinary(val_text), dtype=np.int64)
    return train_ids, val_ids, len(val_text.encode("utf-8")) / len(val_ids)


def batches(data: np.ndarray, steps: int, batch: int, block: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - block - 1, batch)
        x = np.stack([data[s : s + block] for s in starts])
        y = np.stack([data[s + 1 : s + block + 1] for s in starts])
        yield torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def val_loss(model: GPT2Network, data: np.ndarray, block: int, max_windows: int | None = None,
             spread: int = 0) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of the val split: the first `max_windows`
    (all by default), or with `spread` that many spaced evenly over the whole split."""
    model.eval()
    total_windows = (len(data) - 1) // block
    if spread and spread < total_windows:
        starts = np.arange(spread) * (total_windows // spread) * block
    else:
        n = total_windows if max_windows is None else min(total_windows, max_windows)
        starts = np.arange(n) * block
    n = len(starts)
    x = torch.from_numpy(np.stack([data[s : s + block] for s in starts]))
    y = torch.from_numpy(np.stack([data[s + 1 : s + block + 1] for s in starts]))
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


def make_optimizer(model: GPT2Network, args) -> torch.optim.Optimizer:
    if args.optimizer == "muon":
        return Muon(muon_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    return build_optimizer(model, args.lr, args.weight_decay, (0.9, 0.95))


def lr_at_step(step: int, args) -> float:
    return cosine_lr(step, args.lr, args.warmup, args.steps, 0.1 * args.lr)


def train(name: str, cfg: GPT2Config, train_data, val_data, args) -> dict:
    torch.manual_seed(args.seed)
    model = GPT2Network(cfg).train()
    opt = make_optimizer(model, args)
    busiest, drops, window_counts, t_timed, timed_steps, curve = [], [], None, 0.0, 0, {}
    checkpoints = {args.steps * q // 4 for q in (1, 2, 3)}
    t_start = time.perf_counter()
    for step, (x, y) in enumerate(batches(train_data, args.steps, args.batch, args.block, args.seed)):
        set_lr(opt, lr_at_step(step, args))
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
        counts = [layer.stats.routed.clone() for layer in moe_layers(model)]
        m = read_moe_metrics(model)
        if m and step >= args.steps // 2:
            busiest.append(sum(max(load) * len(load) for load in m["moe_load"]) / len(m["moe_load"]))
            drops.append(m["moe_dropped"])
            c = torch.stack(counts)
            window_counts = c if window_counts is None else window_counts + c
        if step + 1 in checkpoints:  # a coarse curve: is the run still improving?
            curve[step + 1] = round(val_loss(model, val_data, args.block, 256), 4)
    row = {
        "name": name,
        "params": model.num_params(),
        "active_params_per_token": active_params(model),
        "val_loss": round(val_loss(model, val_data, args.block, spread=args.val_windows), 4),
        "val_curve_256_windows": curve,
        "tokens_per_s": round(timed_steps * args.batch * args.block / max(t_timed, 1e-9), 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if busiest:
        row["busiest_over_mean"] = round(sum(busiest) / len(busiest), 3)
        share = window_counts.double() / window_counts.sum(1, keepdim=True)
        row["busiest_over_mean_window"] = round(float((share.max(1).values * share.shape[1]).mean()), 3)
        row["busiest_over_mean_per_layer"] = [round(float(v), 3) for v in share.max(1).values * share.shape[1]]
        row["dropped_share"] = round(sum(drops) / len(drops), 4)
    print(json.dumps(row), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(row | {"args": {k: str(v) for k, v in vars(args).items()}}) + "\n")
    return row


def speed(names: list[str], configs: dict[str, GPT2Config], train_data, args) -> list[dict]:
    """Training-step throughput, the models interleaved step by step on the same batches (a load change on
    a shared machine then hits every model alike); 5 untimed warm-up steps each first."""
    models, opts, spent = {}, {}, dict.fromkeys(names, 0.0)
    for n in names:
        torch.manual_seed(args.seed)
        models[n] = GPT2Network(configs[n]).train()
        opts[n] = make_optimizer(models[n], args)
    for step, (x, y) in enumerate(batches(train_data, 5 + args.speed_steps, args.batch, args.block, args.seed)):
        for n in names:
            t0 = time.perf_counter()
            out = models[n](x, targets=y)
            (out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)).backward()
            torch.nn.utils.clip_grad_norm_(models[n].parameters(), 1.0)
            opts[n].step()
            opts[n].zero_grad(set_to_none=True)
            read_moe_metrics(models[n])
            if step >= 5:
                spent[n] += time.perf_counter() - t0
    tokens = args.speed_steps * args.batch * args.block
    rows = [{"name": n, "active_params_per_token": active_params(models[n]),
             "tokens_per_s": round(tokens / spent[n], 1)} for n in names]
    for r in rows:
        r["speed_vs_first"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
        print(json.dumps(r), flush=True)
    return rows


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
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on a shared 2-core box ran 10x slower
    ap.add_argument("--moe-first-layer", type=int, default=0,
                    help="MoE runs: blocks before this one keep a dense FFN (layer 0 is where the imbalance was)")
    ap.add_argument("--bpe-vocab", type=int, default=0,
                    help="tokens of a byte-level BPE of this many ids learned on the train split (0: bytes)")
    ap.add_argument("--only", choices=["moe", "share"], default=None)
    ap.add_argument("--runs", default="", help="comma-separated run names (default: every run of the selection)")
    ap.add_argument("--val-windows", type=int, default=0,
                    help="final val loss over this many windows spread over the split (0: every window)")
    ap.add_argument("--speed-steps", type=int, default=0,
                    help="only time training steps: this many per model, the models interleaved (no quality runs)")
    ap.add_argument("--out", type=Path, default=None, help="append each run's row (JSON line) to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_data, val_data = load_bytes(args.input)
    vocab, bytes_per_token = 256, 1.0
    if args.bpe_vocab:
        train_data, val_data, bytes_per_token = bpe_tokens(train_data, val_data, args.bpe_vocab)
        vocab = args.bpe_vocab
    C, L = args.embd, args.layers
    base = dict(vocab_size=vocab, n_ctx=args.block, n_layer=L, n_head=4, n_embd=C, dropout=0.0,
                attn_dropout=0.0, eos_token_id=0)
    moe_runs = {
        "dense": {},
        "moe_e8_top1": dict(moe_experts=8, moe_top_k=1),
        "moe_e8_top2_half": dict(moe_experts=8, moe_top_k=2, moe_expert_hidden=2 * C),
        "moe_e8_top1_alpha0": dict(moe_experts=8, moe_top_k=1, moe_aux_loss_coef=0.0),
    }
    share_runs = {
        f"none_L{L}": dict(share_layers="none"),  # the same model, seed and batches as "dense"
        f"pairs_L{L}": dict(share_layers="pairs"),
        f"all_L{L}": dict(share_layers="all"),
        f"none_L{L // 2}": dict(share_layers="none", n_layer=L // 2),
    }
    selected = {"moe": moe_runs, "share": share_runs, None: moe_runs | share_runs}[args.only]
    names = [n for n in args.runs.split(",") if n] or list(selected)
    unknown = [n for n in names if n not in moe_runs | share_runs]
    if unknown:
        raise SystemExit(f"unknown run {unknown[0]!r}; runs: {', '.join(moe_runs | share_runs)}")
    out: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                 "train_tokens": len(train_data), "val_tokens": len(val_data),
                 "val_bytes_per_token": round(bytes_per_token, 4)}
    print(json.dumps({k: out[k] for k in ("train_tokens", "val_tokens", "val_bytes_per_token")}), flush=True)
    for kw in moe_runs.values():
        if kw.get("moe_experts"):
            kw["moe_first_layer"] = args.moe_first_layer
    configs = {n: GPT2Config(**(base | kw)) for n, kw in (moe_runs | share_runs).items()}
    if args.speed_steps:
        out["speed"] = speed(names, configs, train_data, args)
        print(json.dumps(out, indent=1))
        return
    rows = {n: train(n, configs[n], train_data, val_data, args) for n in names}
    for r in rows.values():  # the same loss per byte of val text (equal to val_loss at byte level)
        r["val_nats_per_byte"] = round(r["val_loss"] / bytes_per_token, 4)
    if "dense" in rows:
        dense = rows["dense"]
        for r in rows.values():
            r["val_loss_minus_dense"] = round(r["val_loss"] - dense["val_loss"], 4)
            r["val_nats_per_byte_minus_dense"] = round(r["val_nats_per_byte"] - dense["val_nats_per_byte"], 4)
            r["speed_vs_dense"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
    out["runs"] = list(rows.values())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
