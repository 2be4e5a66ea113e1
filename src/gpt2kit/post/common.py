"""What every post-training command shares: reading a checkpoint, writing the new one beside it, and
measuring what changed (perplexity on a text, size on disk, generation speed)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import UserError, require_dir, require_file
from ..fileio import read_json

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# files that belong to training, not to the model: never carried into a post-trained checkpoint
_NOT_COPIED = {"trainer_state.pt", *WEIGHT_FILES}


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's gpt2kit.json ({} for a plain Hugging Face directory)."""
    path = require_dir(path, "checkpoint directory")
    f = path / "gpt2kit.json"
    meta = read_json(f, "gpt2kit checkpoint metadata") if f.exists() else {}
    if not isinstance(meta, dict):
        raise UserError(f"{f}: expected a JSON object")
    return meta


def weights_size(path: str | Path) -> int:
    """Bytes of the weights file of a checkpoint directory."""
    for name in WEIGHT_FILES:
        f = Path(path) / name
        if f.exists():
            return f.stat().st_size
    raise UserError(f"no weights in {path}: expected {' or '.join(WEIGHT_FILES)}")


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, config and metadata files of `src` (not its weights or training state) to `dst`."""
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def load_tokenizer(path: str | Path):
    from ..tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def read_eval_text(path: str | Path | None) -> str | None:
    if path is None:
        return None
    p = require_file(path, "--eval-text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--eval-text file is not UTF-8: {p} (byte {e.start})") from None


def perplexity(model, tokenizer, text: str, max_tokens: int | None = None) -> dict[str, float]:
    """Sliding-window perplexity of `text` (gpt2kit.eval), optionally on its first `max_tokens` tokens."""
    from ..eval import evaluate_text

    if max_tokens:
        ids = tokenizer.encode(text, allowed_special="all")
        if len(ids) > max_tokens:
            text = tokenizer.decode(ids[:max_tokens])
    model.eval()
    r = evaluate_text(model, tokenizer, text, mode="sliding")
    return {"ppl": float(r["ppl"]), "ce": float(r["ce"]), "tokens": int(r["tokens"])}


def generation_speed(model, new_tokens: int = 32, prompt_len: int = 16, repeats: int = 1) -> float:
    """New tokens per second of greedy KV-cached decoding at batch 1 (median over `repeats`)."""
    import torch

    from ..generate import generate

    model.eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len))
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0)
        rates.append((out.shape[1] - prompt_len) / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def print_report(report: dict[str, Any], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(report, indent=2))
        return
    for k, v in report.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:>24}: {v}")


# trainer settings the finetune and distill commands expose: flag -> (type, help)
TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "lr": (float, "peak learning rate"),
    "max_steps": (int, "optimizer steps"),
    "warmup_steps": (int, "linear warm-up steps"),
    "schedule": (str, "cosine | inverse_sqrt | constant"),
    "min_lr": (float, "floor of the cosine schedule"),
    "weight_decay": (float, "AdamW weight decay on matrices"),
    "batch_size": (int, "rows per micro-batch"),
    "block_size": (int, "tokens per row (context used in training)"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "dropout": (float, "dropout of the trained model"),
    "eval_every": (int, "steps between validations (0: only at the end)"),
    "save_every": (int, "steps between checkpoints (0: only at the end)"),
    "eval_batches": (int, "cap on validation batches (0: the whole split)"),
    "seed": (int, "random seed"),
    "device": (str, "auto | cpu | cuda | cuda:N | mps"),
    "dtype": (str, "fp32 | bf16 | fp16"),
    "threads": (int, "torch CPU threads (0: torch's default)"),
}


def add_train_flags(parser, defaults: dict[str, Any], only: tuple[str, ...] | None = None) -> None:
    g = parser.add_argument_group("training")
    for key, (typ, help_text) in TRAIN_FLAGS.items():
        if only is not None and key not in only:
            continue
        d = defaults.get(key)
        g.add_argument("--" + key.replace("_", "-"), dest=key, type=typ, default=None,
                       help=f"{help_text} (default: {d if d is not None else 'as gpt2kit train'})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def train_overrides(args) -> dict[str, Any]:
    """The training flags the user gave, coerced and checked by the trainer's own config rules."""
    from ..train.config import coerce, flag_name

    out = {k: coerce(k, getattr(args, k), flag_name(k)) for k in TRAIN_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "no_progress", False):
        out["progress"] = False
    return out
