"""nanoGPT's CPU "baby GPT" recipe on tinyshakespeare, with gpt2kit's own BPE tokenizer. Prints JSON.

The recipe (nanoGPT config/train_shakespeare_char.py, CPU variant): 4 layers, 4 heads, d=128, block 64,
batch 12, 2000 iterations, LR 1e-3 cosine to 1e-4 with 100 warm-up steps, beta2 0.99, dropout 0, gradient
clipping 1.0; the first 90% of the characters train, the last 10% validate. nanoGPT is character-level;
here a byte-level BPE of --vocab-size tokens is learned on the training 90% only, and the model is the
same shape (its embedding grows with the vocabulary). Measured on this machine (see PERF-NOTES):
nanoGPT reaches validation loss 1.886 nats/char = 2.72 bits per character in 124 s wall.

Bits per character = (validation nats summed over every token of the last 10%) / ln 2 / characters, so the
two tokenizations are compared on the same text.

  python benchmarks/train_shakespeare.py [--input tinyshakespeare.txt] [--vocab-size 1024] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = Path(os.environ.get("GPT2KIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare.txt"
NANOGPT = {"val_loss_nats_per_char": 1.886, "val_bpc": 2.72, "wall_s": 124.0}


def write_shards(out: Path, tok, train_text: str, val_text: str) -> dict:
    """train.bin / val.bin / meta.json in `gpt2kit data prepare`'s format: one document per split."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    splits = {}
    for name, text in (("train", train_text), ("val", val_text)):
        ids = np.array(tok.encode_ordinary(text) + [tok.eos_id], dtype=np.dtype(dtype).newbyteorder("<"))
        ids.tofile(out / f"{name}.bin")
        np.array([len(ids)], dtype="<u8").tofile(out / f"{name}.idx")
        splits[name] = {"documents": 1, "tokens": len(ids), "characters": len(text),
                        "bytes": len(text.encode("utf-8"))}
    tok_dir = out / "tokenizer"
    tok.save(tok_dir)
    meta = {"format": 1, "dtype": dtype, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "tokenizer_fingerprint": tok.fingerprint, "tokenizer": str(tok_dir.resolve()), "splits": splits}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(DEFAULT_INPUT))
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default="", help="working directory (default: a temporary one)")
    args = ap.parse_args()

    import torch

    from gpt2kit.tokenizer import Tokenizer
    from gpt2kit.train.config import build_config
    from gpt2kit.train.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    text = Path(args.input).read_text(encoding="utf-8")
    n = len(text)
    train_text, val_text = text[: int(n * 0.9)], text[int(n * 0.9) :]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="shakespeare-"))

    t0, c0 = time.perf_counter(), time.process_time()
    tok = Tokenizer.train([train_text], args.vocab_size, progress=False)
    t_tok = time.perf_counter() - t0
    meta = write_shards(work / "shards", tok, train_text, val_text)
    t_data = time.perf_counter() - t0 - t_tok

    cfg = build_config({
        "data": str(work / "shards"), "out": str(work / "run"), "preset": "gpt2-mini",
        "n_layer": 4, "n_head": 4, "n_embd": 128, "n_ctx": 64, "dropout": 0.0, "attn_dropout": 0.0,
        "block_size": 64, "batch_size": 12, "max_steps": args.max_steps, "lr": 1e-3, "min_lr": 1e-4,
        "warmup_steps": 100, "schedule": "cosine", "beta2": 0.99, "grad_clip": 1.0,
        "eval_every": 0, "save_every": 0, "log_every": 100, "seed": 1337, "device": "cpu",
        "dtype": args.dtype, "progress": False, "eval_batch_size": 64,
    })
    t1 = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)
    result = trainer.fit()
    trainer.close()
    t_train = time.perf_counter() - t1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0  # CPU seconds of all threads: steadier than wall on a busy machine
    v = result.val
    if v is None:
        sys.exit(f"training stopped early at step {result.step} ({result.stopped_by}); no result")
    val_chars = meta["splits"]["val"]["characters"]
    out = {
        "benchmark": "train_shakespeare",
        "recipe": "nanoGPT baby GPT: 4L 4H d128, block 64, batch 12, lr 1e-3 cosine, dropout 0, 90/10 split",
        "vocab_size": args.vocab_size,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "steps": result.step,
        "params": trainer.bare.num_params(),
        "train_tokens": meta["splits"]["train"]["tokens"],
        "val_tokens": meta["splits"]["val"]["tokens"],
        "val_characters": val_chars,
        "chars_per_token_val": val_chars / meta["splits"]["val"]["tokens"],
        "epochs": result.step * 12 * 64 / meta["splits"]["train"]["tokens"],
        "final_train_loss_nats_per_token": result.train_loss,
        "val_loss_nats_per_token": v["val_loss"],
        "val_loss_nats_per_char": v["val_bpc"] * math.log(2),
        "val_bpc": v["val_bpc"],
        "wall_s": wall,
        "cpu_s": cpu,
        "wall_tokenizer_s": t_tok,
        "wall_shards_s": t_data,
        "wall_train_and_eval_s": t_train,
        "train_tokens_per_s": result.tokens_per_s,
        "nanogpt_reference": NANOGPT,
        "bpc_ratio_vs_nanogpt": v["val_bpc"] / NANOGPT["val_bpc"],
        "wall_ratio_vs_nanogpt": wall / NANOGPT["wall_s"],
    }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
