"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO / hinge variants, as TRL computes them.

For a pair (x, y_c, y_r) the policy's implicit reward of a completion is beta * (log pi(y|x) - log
pi_ref(y|x)), log-probs summed over the completion's tokens only (prompt and padding masked). Losses:
  sigmoid  -log sigmoid(beta * (d_c - d_r))            d = log pi - log pi_ref (summed)
  hinge    relu(1 - beta * (d_c - d_r))
  ipo      (d_c / n_c - d_r / n_r - 1 / (2 beta))^2   n = completion tokens (TRL's length-normalised IPO)
The reference is the starting checkpoint: its log-probs are computed once, before training, and the
reference model is gone by the time the policy trains (one model in memory, not two).
Logged as TRL names them: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .loop import Optimizer, cycle_batches, load_policy, log_stderr, options, save_policy, write_result
from .pairs import completion_logps, encode_completion, pad_batch, read_pairs, split_pairs

LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean loss, TRL-named metrics) from summed completion log-probs [B] of policy and reference.
    `*_tokens` (completion lengths [B]) are needed by ipo only."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completion lengths")
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {loss_type!r}")
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }
    return losses.mean(), metrics


@dataclass
class EncodedPairs:
    """Token rows of the chosen and rejected completions, and (once computed) the reference's log-probs."""

    chosen: list[tuple[list[int], int]]
    rejected: list[tuple[list[int], int]]
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)


def encode_pairs(pairs, tokenizer, max_len: int) -> EncodedPairs:
    enc = EncodedPairs([], [])
    for p in pairs:
        enc.chosen.append(encode_completion(tokenizer, p.prompt, p.chosen, max_len, eos=True))
        enc.rejected.append(encode_completion(tokenizer, p.prompt, p.rejected, max_len, eos=True))
    return enc


def concatenated_batch(enc: EncodedPairs, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One right-padded batch [chosen rows; rejected rows] (TRL's concatenated layout)."""
    return pad_batch([enc.chosen[i] for i in rows] + [enc.rejected[i] for i in rows], pad_id)


@torch.no_grad()
def pair_logps(model, enc: EncodedPairs, pad_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen [N], rejected [N]) of every pair under `model` (eval mode)."""
    was = model.training
    model.eval()
    ch, rj = [], []
    for i in range(0, len(enc), batch_size):
        rows = list(range(i, min(i + batch_size, len(enc))))
        idx, mask = concatenated_batch(enc, rows, pad_id)
        c, r = completion_logps(model, idx, mask).chunk(2)
        ch.append(c)
        rj.append(r)
    model.train(was)
    return torch.cat(ch), torch.cat(rj)


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, enc: EncodedPairs) -> float:
    """Share of pairs where the model gives the chosen completion the higher log-prob per token."""
    nc = torch.tensor([len(ids) - n for ids, n in enc.chosen], dtype=chosen.dtype)
    nr = torch.tensor([len(ids) - n for ids, n in enc.rejected], dtype=chosen.dtype)
    return float((chosen / nc > rejected / nr).float().mean())


def _held_out(model, val: EncodedPairs, pad: int, beta: float) -> dict[str, float]:
    c, r = pair_logps(model, val, pad)
    out = {"pref_accuracy": preference_accuracy(c, r, val)}
    out["rewards/accuracies"] = float(((c - val.ref_chosen) > (r - val.ref_rejected)).float().mean())
    out["rewards/margins"] = float(beta * ((c - val.ref_chosen) - (r - val.ref_rejected)).mean())
    return out


def train_dpo(init: str | Path, data: str | Path, out: str | Path, beta: float = 0.1, loss_type: str = "sigmoid",
              overrides: dict[str, Any] | None = None, val_fraction: float = 0.1, overwrite: bool = False,
              resume: bool = False, save_every: int = 0, stop_after: int | None = None,
              log=log_stderr) -> dict[str, Any]:
    """DPO from checkpoint `init` on preference pairs; OUT is the new checkpoint (+ metrics.jsonl).
    Ctrl-C / SIGTERM (or `stop_after` steps, for tests) saves a resume checkpoint in OUT; `resume` continues it."""
    from .parallel import check_batch, join, main_only, mean_metrics, shard
    from .resume import Progress, batch_loop_state, prepare_out, restore_batch_loop

    env = join()  # torchrun: this rank's share of every batch, gradients averaged (align.parallel)
    if not env.is_main:
        log = lambda m: None  # noqa: E731 (rank 0 speaks for the job)
    if loss_type not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {loss_type!r}")
    if not beta > 0:
        raise UserError(f"--beta must be > 0, got {beta}")
    o = options(overrides)
    check_batch(int(o["batch_size"]), env)
    out, state, step_dir = prepare_out(out, "dpo", overwrite, resume)
    model, tokenizer, template = load_policy(init)
    block = min(int(o["block_size"]), model.config.n_ctx)
    train_pairs, val_pairs = split_pairs(read_pairs(data, template), val_fraction, o["seed"])
    pad = tokenizer.eos_id
    train, val = encode_pairs(train_pairs, tokenizer, block), encode_pairs(val_pairs, tokenizer, block)
    max_steps = int(o["max_steps"])
    if state is None:
        # the reference IS the starting model: its log-probs now, once; no second copy is ever made
        t0 = time.perf_counter()
        train.ref_chosen, train.ref_rejected = pair_logps(model, train, pad)
        if len(val):
            val.ref_chosen, val.ref_rejected = pair_logps(model, val, pad)
        log(f"reference log-probs of {len(train) + len(val)} pairs in {time.perf_counter() - t0:.1f} s")
        before = _held_out(model, val, pad, beta) if len(val) else {}
    else:  # the reference's log-probs were saved with the run: the weights in step_dir are the policy's
        train.ref_chosen, train.ref_rejected, val.ref_chosen, val.ref_rejected = state["reference_logps"]
        before = dict(state["before"])
        model, _, _ = load_policy(step_dir)

    torch.manual_seed(o["seed"])
    model.train()
    opt = Optimizer(model, o, env)
    take = cycle_batches(len(train), int(o["batch_size"]), o["seed"] + 1)
    metrics: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        metrics, start = restore_batch_loop(state, opt, take)

    def trainer_state() -> dict[str, Any]:
        return batch_loop_state(opt, take, metrics, before, reference_logps=[train.ref_chosen, train.ref_rejected,
                                                                             val.ref_chosen, val.ref_rejected])

    t0 = time.perf_counter()
    with Progress(out, "dpo", save_every, stop_after, log, env) as progress:
        for step in range(start, max_steps):
            rows = shard(take(), env)  # every rank draws the same global batch and keeps its share
            idx, mask = concatenated_batch(train, rows, pad)
            c, r = completion_logps(model, idx, mask).chunk(2)
            nc, nr = mask[:, 1:].sum(-1).chunk(2)
            loss, m = dpo_loss(c, r, train.ref_chosen[rows], train.ref_rejected[rows], beta, loss_type, nc, nr)
            norm = opt.step(step, loss)
            m = mean_metrics({"loss": loss.item(), **m}, env)
            metrics.append({"step": step + 1, "loss": m.pop("loss"), "grad_norm": norm, **m})
            if progress.after_step(step + 1, max_steps, lambda d: save_policy(init, model, d), trainer_state):
                return progress.report(step + 1)
    wall = time.perf_counter() - t0
    model.eval()
    after = _held_out(model, val, pad, beta) if len(val) else {}
    if val:
        metrics.append({"step": int(o["max_steps"]), **{f"val/{k}": v for k, v in after.items()}})
    extra = {"dpo": {"init": str(init), "data": str(data), "beta": beta, "loss": loss_type,
                     "steps": int(o["max_steps"]), "lr": o["lr"], "reference": "precomputed log-probs of init"}}
    extra["dpo"]["processes"] = env.world_size
    main_only(env, lambda: write_result(out, init, model, metrics, extra, overwrite=out.exists(),
                                        chat_template=template))
    log(f"DPO ({loss_type}, beta {beta}): {int(o['max_steps'])} steps in {wall:.1f} s"
        + (f"; held-out preference accuracy {before['pref_accuracy']:.3f} -> {after['pref_accuracy']:.3f}"
           if val else ""))
    return {"out": str(out), "steps": int(o["max_steps"]), "wall_s": wall,
            **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}}
