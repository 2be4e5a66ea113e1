"""Fit a model to a time budget: time a few training steps of candidate shapes on this machine, keep the
largest one that still sees enough tokens in the time there is.

Small budgets are data-limited before they are parameter-limited: in the main job's budget on a
2-core AVX2 CPU a 1.4M-parameter model ends lower than a 4.3M one fed a third as many tokens (docs/
train.md has the measurements). So the plan walks the candidates from small to large and stops at the
first one whose token budget falls under `min_tokens_per_param` times its parameter count. The
measurement trains the real network with the real optimizer on random ids, so it sees everything that
costs time on this machine: its matrix-multiply speed, its threads, the optimizer's own work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int

    def __str__(self) -> str:
        return f"L{self.n_layer} H{self.n_head} d{self.n_embd}"


@dataclass(frozen=True)
class Plan:
    shape: Shape
    params: int
    seconds_per_step: float
    steps: int  # optimizer steps that fit the training budget at the measured speed
    tokens: int
    measured: tuple[tuple[Shape, float], ...]  # (shape, seconds per step) of every candidate timed

    def describe(self) -> str:
        timed = ", ".join(f"{s} {t * 1000:.0f} ms" for s, t in self.measured)
        return (f"{self.shape} ({self.params / 1e6:.2f}M parameters): {self.seconds_per_step * 1000:.0f} ms a step "
                f"-> ~{self.steps} steps, {self.tokens / 1e6:.2f}M tokens (timed: {timed})")


def time_training_step(
    shape: Shape,
    vocab_size: int,
    block_size: int,
    batch_size: int,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    device: str = "cpu",
    dtype: str = "fp32",
    timed_steps: int = 3,
) -> tuple[float, int]:
    """(fastest of `timed_steps` optimizer steps after one warm-up step, parameter count) for `shape`.

    The fastest, as timeit reports: on a shared 2-core machine one step in two can be stalled by other
    work (a median of two steps read 2x the quiet time there), while the run itself averages that out."""
    from ..model.config import GPT2Config
    from ..model.gpt2 import GPT2Network

    cfg = GPT2Config(vocab_size=vocab_size, n_ctx=block_size, n_layer=shape.n_layer, n_head=shape.n_head,
                     n_embd=shape.n_embd, dropout=0.0, attn_dropout=0.0, eos_token_id=vocab_size - 1)
    gen = torch.Generator().manual_seed(0)
    model = GPT2Network(cfg).to(device)
    model.train()
    opt = make_optimizer(model)
    x = torch.randint(0, vocab_size, (batch_size, block_size), generator=gen).to(device)
    y = torch.randint(0, vocab_size, (batch_size, block_size), generator=gen).to(device)
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    times = []
    for i in range(timed_steps + 1):
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first step allocates and warms the kernels up
            times.append(time.perf_counter() - t0)
    return min(times), model.num_params()


def plan_for_budget(
    candidates: Sequence[Shape],
    train_seconds: float,
    vocab_size: int,
    block_size: int,
    batch_size: int,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    min_tokens_per_param: float,
    device: str = "cpu",
    dtype: str = "fp32",
) -> Plan:
    """The largest of `candidates` (smallest first) whose tokens in `train_seconds` are at least
    `min_tokens_per_param` x its parameters; the smallest one if none qualifies."""
    measured: list[tuple[Shape, float]] = []
    chosen: Plan | None = None
    for shape in candidates:
        seconds, params = time_training_step(shape, vocab_size, block_size, batch_size, make_optimizer, device, dtype)
        measured.append((shape, seconds))
        steps = int(train_seconds / seconds)
        tokens = steps * batch_size * block_size
        if chosen is not None and tokens < min_tokens_per_param * params:
            break
        chosen = Plan(shape, params, seconds, steps, tokens, ())
        if tokens < min_tokens_per_param * params:
            break  # even the smallest is short of data here: take it, larger ones are worse
    assert chosen is not None
    return Plan(chosen.shape, chosen.params, chosen.seconds_per_step, chosen.steps, chosen.tokens, tuple(measured))
