"""The main job, `gpt2kit train` with no arguments: raw text to a trained, evaluated GPT-2 in ~5 minutes.

1. corpus: the Python standard library's own modules (no test suites, no codec tables), ~10 MB of the
   built-in default corpus, so nothing is downloaded;
2. tokenizer + shards: a 4096-token byte-level BPE learned on it, then de-duplicated token shards with a
   5% validation split (`gpt2kit.data.prepare`);
3. a plan (`train/budget.py`): a few training steps of candidate shapes are timed on this machine and
   the largest shape that still sees enough tokens in the remaining time is kept: a small model fed many
   tokens beats a large one fed few at this budget (docs/train.md has the measurements);
4. training: Muon on the hidden matrices (AdamW on embeddings, biases and norms), context 256, bf16
   autocast where the CPU has bf16 instructions, cosine schedule fitted to the time left (`time_limit`);
5. report: validation loss, perplexity, bits per character, and a sample; the checkpoint directory opens
   in `transformers.GPT2LMHeadModel.from_pretrained`.

Any training flag overrides the defaults, e.g. `gpt2kit train --max-steps 100 --out runs/quick`; a shape
flag (--n-layer, --n-head, --n-embd) skips the plan.
"""

from __future__ import annotations

import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .budget import Plan, Shape, plan_for_budget

BUDGET_S = 300.0  # the whole job, on 2 CPU cores
REPORT_RESERVE_S = 15.0  # final evaluation of the whole val split, checkpoint, sample (~6 s measured)
CORPUS_STRIDE = 1  # every standard-library module (test suites and codec tables left out)
VOCAB_SIZE = 4096
VAL_FRACTION = 0.05
SAMPLE_PROMPT = "def"  # no trailing space: " name" is one token, a lone " " before it is out of distribution

# Candidate shapes, smallest first, each with its peak learning rate (Muon; ~1/sqrt(width) above d128).
# Measured on a 2-core AVX2 CPU at about equal compute (docs/train.md): a shallow, narrow model fed many
# tokens ends lower than a deeper or wider one fed fewer (L2 d96 1.49 bits per character, L3 d96 1.55,
# L3 d128 1.59, L4 d128 1.65, L4 d192 1.75). The plan keeps the largest shape that sees at least
# MIN_TOKENS_PER_PARAM tokens per parameter (embeddings counted) in the time left: L2 d96 there (~4),
# not L2 d128 (~2); a machine twice as fast gets L2 d128, and so on up the list.
CANDIDATES: dict[Shape, float] = {
    Shape(2, 2, 64): 1e-2,
    Shape(2, 2, 96): 1e-2,
    Shape(2, 2, 128): 1e-2,
    Shape(3, 2, 128): 1e-2,
    Shape(4, 3, 192): 8e-3,
    Shape(4, 4, 256): 7e-3,
    Shape(6, 6, 384): 5e-3,
    Shape(8, 8, 512): 4e-3,
}
MIN_TOKENS_PER_PARAM = 3.0
SHAPE_KEYS = ("n_layer", "n_head", "n_embd")
WARMUP_FRACTION = 0.08

DEFAULTS: dict[str, Any] = {
    "preset": "gpt2-mini",
    "n_ctx": 256,
    "dropout": 0.0,
    "attn_dropout": 0.0,
    "block_size": 256,
    "batch_size": 8,
    "eval_batch_size": 16,
    "eval_batches": 0,  # the whole validation split
    "optimizer": "muon",
    "lr": 1e-2,  # the plan's shape sets its own (CANDIDATES)
    "min_lr": 1e-4,
    "schedule": "cosine",
    "eval_every": 0,  # once, at the end: an evaluation costs the steps it would take
    "save_every": 0,  # at the end (and on Ctrl-C, which saves and says how to resume)
    "keep_last": 2,
    "log_every": 10,
    "seed": 1337,
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free_run_dir(base: Path = Path("runs")) -> Path:
    """runs/main-job, or runs/main-job-2, -3, ...: a previous run is never overwritten."""
    candidate, n = base / "main-job", 1
    while candidate.exists():
        n += 1
        candidate = base / f"main-job-{n}"
    return candidate


def corpus_files() -> list[str]:
    """The standard library's own modules (test suites and codec tables left out), every CORPUS_STRIDE-th."""
    from ..data import default_corpus_files

    # test suites, and the codec tables of encodings/ (hex literals and character names, not prose or code)
    skip = ("test", "tests", "idle_test", "encodings")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f for f in default_corpus_files()
        if not any(p in skip for p in f.relative_to(root).parts) and f.stat().st_size > 0  # (empty __init__.py)
    ]
    if not files:
        raise UserError("the default corpus is empty: this interpreter ships no standard-library sources")
    return [str(f) for f in files[::CORPUS_STRIDE]]


def _fast_bf16(device: str) -> bool:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_bf16_supported()
    from .precision import cpu_bf16_native

    return cpu_bf16_native()[0]


def run_main_job(overrides: dict[str, Any], overwrite: bool = False) -> int:
    t0 = time.perf_counter()
    from ..data.readers import ReadOptions
    from ..data.shards import prepare
    from .config import build_config
    from .trainer import Trainer

    out = Path(overrides.pop("out", "") or _free_run_dir())
    data_dir = out / "data"
    files = corpus_files()
    _say(f"gpt2kit main job -> {out}")
    _say(f"[1/4] corpus: {len(files)} standard-library modules; tokenizer ({VOCAB_SIZE} tokens) and shards")
    prepare(
        files, None, data_dir, val_fraction=VAL_FRACTION, seed=0, workers=2,
        read=ReadOptions(errors="replace"), train_tokenizer_vocab=VOCAB_SIZE, overwrite=overwrite,
        progress=True, log=_say,
    )
    device = str(overrides.get("device", "auto"))
    flags = {**DEFAULTS, "dtype": "bf16" if _fast_bf16(device) else "fp32"}
    flags.update(overrides)
    flags["data"], flags["out"] = str(data_dir), str(out)
    if not any(k in overrides for k in SHAPE_KEYS):
        plan = _plan(flags, BUDGET_S - REPORT_RESERVE_S - (time.perf_counter() - t0) - 5.0)
        _say(f"      plan: {plan.describe()}")
        flags.update(n_layer=plan.shape.n_layer, n_head=plan.shape.n_head, n_embd=plan.shape.n_embd)
        if "lr" not in overrides:
            flags["lr"] = CANDIDATES[plan.shape]
        if "max_steps" not in overrides:
            flags["max_steps"] = max(1, plan.steps)
    flags.setdefault("max_steps", 1000)
    flags.setdefault("warmup_steps", max(1, round(WARMUP_FRACTION * flags["max_steps"])))
    spent = time.perf_counter() - t0
    if "time_limit" not in overrides:
        flags["time_limit"] = max(30.0, BUDGET_S - REPORT_RESERVE_S - spent - 5.0)
    cfg = build_config(flags)
    _say(f"[2/4] training (dtype {cfg.run.dtype}; up to {cfg.run.max_steps} steps, "
         f"time limit {cfg.run.time_limit:.0f} s)")
    trainer = Trainer(cfg, overwrite=overwrite)
    try:
        result = trainer.fit()
        if result.stopped_by:  # Ctrl-C / SIGTERM: the trainer saved and said how to resume
            return 0
        _say("[3/4] evaluation and sample")
        sample = _sample(trainer)
    finally:
        trainer.close()
    v = result.val or {}
    print(f"validation: loss {v.get('val_loss', math.nan):.4f} nats/token, perplexity {v.get('val_ppl', math.nan):.2f}, "
          f"bits per character {v.get('val_bpc', math.nan):.4f} (bits per byte {v.get('val_bpb', math.nan):.4f})")
    print(f"train loss {result.train_loss:.4f} after {result.step} steps, {result.tokens_per_s:,.0f} tokens/s")
    print(f"sample (prompt {SAMPLE_PROMPT!r}, temperature 0.8, top-k 40):")
    print("-" * 60)
    print(sample)
    print("-" * 60)
    print(f"[4/4] checkpoint: {result.last_checkpoint}  (best: {result.best_dir})")
    print(f"      transformers.GPT2LMHeadModel.from_pretrained({str(result.last_checkpoint)!r}) opens it;")
    print(f"      gpt2kit generate {result.last_checkpoint} --prompt 'import '")
    print(f"total time {time.perf_counter() - t0:.0f} s")
    return 0


def _plan(flags: dict[str, Any], train_seconds: float) -> Plan:
    """Time the candidate shapes' training steps here and keep the largest that sees enough tokens."""
    import torch

    from .config import build_config
    from .optim import optimizer_for

    cfg = build_config({**flags, "max_steps": 1})  # the optimizer exactly as the run will build it
    if flags.get("threads"):
        torch.set_num_threads(int(flags["threads"]))
    dev = str(flags.get("device", "auto"))
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev
    return plan_for_budget(
        tuple(CANDIDATES), max(10.0, train_seconds), VOCAB_SIZE, cfg.data.block_size, cfg.data.batch_size,
        lambda model: optimizer_for(model, cfg.optim), MIN_TOKENS_PER_PARAM, device=dev,
        dtype=cfg.run.dtype,
    )


def _sample(trainer) -> str:
    import torch

    tok = trainer.tokenizer
    if tok is None:
        return "(no tokenizer)"
    model = trainer.bare
    model.eval()
    idx = torch.tensor([tok.encode_ordinary(SAMPLE_PROMPT)], device=trainer.device)
    with torch.no_grad(), trainer.autocast():
        ids = model.generate(idx, max_new_tokens=120, temperature=0.8, top_k=40, seed=0, eos_id=tok.eos_id)
    return tok.decode([i for i in ids[0].tolist() if i != tok.eos_id])
