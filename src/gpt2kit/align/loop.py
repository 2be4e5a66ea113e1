"""What the alignment trainers share: the optimizer step, metrics rows, and writing the result.

The result directory OUT is itself a checkpoint (config.json, model.safetensors, tokenizer files,
gpt2kit.json) with `metrics.jsonl` beside the weights, written atomically as a whole.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .defaults import ALIGN_DEFAULTS


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def options(overrides: dict[str, Any] | None, **defaults: Any) -> dict[str, Any]:
    o = dict(ALIGN_DEFAULTS, **defaults)
    o.update(overrides or {})
    if o["threads"]:
        torch.set_num_threads(int(o["threads"]))
    return o


def check_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output exists and is not empty: {out} (choose another path or pass --overwrite)")
    return out


def load_policy(init: str | Path):
    """(model in float32, tokenizer, chat template or None) of a float gpt2kit / HF GPT-2 checkpoint."""
    from ..model import GPT2
    from ..post.common import checkpoint_meta, load_tokenizer
    from .chat import load_chat_template

    if "quantization" in checkpoint_meta(init):
        raise UserError(f"--init {init} is quantized (inference only); train the float checkpoint instead")
    return GPT2.from_pretrained(init, dtype=torch.float32), load_tokenizer(init), load_chat_template(init)


class Optimizer:
    """AdamW on every trainable parameter, with gpt2kit's learning-rate schedule and gradient clipping."""

    def __init__(self, module: torch.nn.Module, o: dict[str, Any]):
        from ..train.optim import param_groups

        self.o = o
        self.module = module
        self.opt = torch.optim.AdamW(param_groups(module, o["weight_decay"]), lr=o["lr"], betas=(0.9, 0.95))

    def step(self, step: int, loss: torch.Tensor) -> float:
        """Backward `loss` and apply one step at schedule position `step`; returns the gradient norm."""
        from ..train.optim import lr_at, set_lr

        o = self.o
        set_lr(self.opt, lr_at(step, o["schedule"], o["lr"], o["warmup_steps"], o["max_steps"], o["min_lr"]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = o["grad_clip"] if o["grad_clip"] else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
        self.opt.step()
        return norm


def cycle_batches(n: int, batch_size: int, seed: int) -> Callable[[], list[int]]:
    """next() -> indices of the next batch: seeded epochs of a shuffled order."""
    import random

    rng = random.Random(seed)
    order: list[int] = []

    def take() -> list[int]:
        nonlocal order
        while len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        got, order = order[:batch_size], order[batch_size:]
        return got

    return take


def write_result(out: Path, init: str | Path, model, metrics: list[dict[str, Any]], extra: dict[str, Any],
                 overwrite: bool, chat_template: str | None = None,
                 after_save: Callable[[Path], None] | None = None) -> Path:
    """OUT = a checkpoint (tokenizer and metadata of `init`, the new weights) + metrics.jsonl."""
    from ..fileio import atomic_dir, atomic_write_text
    from ..post.common import copy_model_files
    from .chat import save_chat_template

    with atomic_dir(out, overwrite=overwrite) as tmp:
        copy_model_files(init, tmp)
        model.save_pretrained(tmp, extra=extra)
        if chat_template is not None:
            save_chat_template(tmp, chat_template)
        if after_save is not None:
            after_save(tmp)
        atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    return out
