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


def save_policy(init: str | Path, model, directory: Path) -> None:
    """A resume checkpoint's model files: `init`'s tokenizer and metadata, the current weights."""
    from ..post.common import copy_model_files

    copy_model_files(init, directory)
    model.save_pretrained(directory)


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

    def __init__(self, module: torch.nn.Module, o: dict[str, Any], env=None):
        from ..train.optim import param_groups

        self.o = o
        self.module = module
        self.env = env  # align.parallel: under torchrun the gradients are averaged over ranks
        self.opt = torch.optim.AdamW(param_groups(module, o["weight_decay"]), lr=o["lr"], betas=(0.9, 0.95))

    def step(self, step: int, loss: torch.Tensor) -> float:
        """Backward `loss` and apply one step at schedule position `step`; returns the gradient norm."""
        from ..train.optim import lr_at, set_lr

        o = self.o
        set_lr(self.opt, lr_at(step, o["schedule"], o["lr"], o["warmup_steps"], o["max_steps"], o["min_lr"]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.env is not None:
            from .parallel import average_gradients

            average_gradients(self.module, self.env)
        clip = o["grad_clip"] if o["grad_clip"] else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip))
        self.opt.step()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


class BatchCycle:
    """take() -> indices of the next batch: seeded epochs of a shuffled order (its state resumes exactly)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        import random

        self.n, self.batch_size = n, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __call__(self) -> list[int]:
        while len(self.order) < self.batch_size:
            fresh = list(range(self.n))
            self.rng.shuffle(fresh)
            self.order += fresh
        got, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return got

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..train.checkpoint import _as_tuple

        self.rng.setstate(_as_tuple(state["rng"]))
        self.order = [int(i) for i in state["order"]]


def cycle_batches(n: int, batch_size: int, seed: int) -> BatchCycle:
    return BatchCycle(n, batch_size, seed)


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
