"""Reward models: a GPT-2 trunk and a linear score head read at the last real token, trained on
preference pairs with the Bradley-Terry loss -log sigmoid(r(x, y_c) - r(x, y_r)).

Saved as Hugging Face's `GPT2ForSequenceClassification` (num_labels 1): the trunk's tensors under
`transformer.*`, the head as `score.weight`, and `pad_token_id` (= EOS) in config.json, so
`GPT2ForSequenceClassification.from_pretrained(RM)` reads the score at the same token: the last one
that is not padding (transformers' rule, used here too).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError, require_dir
from .loop import Optimizer, cycle_batches, load_policy, log_stderr, options
from .pairs import encode_completion, pad_batch, read_pairs, split_pairs

ARCHITECTURE = "GPT2ForSequenceClassification"
SCORE = "score.weight"


class RewardModel(nn.Module):
    """r(ids) [B]: the trunk's final hidden state at the last non-padding token, times the score head."""

    def __init__(self, trunk: nn.Module, pad_id: int):
        super().__init__()
        trunk.lm_head = nn.Identity()  # the trunk returns hidden states; a reward model has no LM head
        self.trunk = trunk
        self.config = trunk.config
        self.pad_id = int(pad_id)
        self.score = nn.Linear(trunk.config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, std=1.0 / (trunk.config.n_embd + 1) ** 0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(idx).logits  # [B, T, d]
        T = idx.shape[1]
        last = (torch.arange(T, device=idx.device) * (idx != self.pad_id)).argmax(-1)
        return self.score(hidden[torch.arange(idx.shape[0], device=idx.device), last]).squeeze(-1).float()


def save_reward_model(rm: RewardModel, init: str | Path, out: Path, extra: dict[str, Any]) -> None:
    """Write RM into directory `out` (which exists, e.g. an atomic_dir staging folder)."""
    from .. import __version__
    from ..fileio import atomic_write_json, update_json
    from ..model.hf import save_safetensors, to_hf_state_dict
    from ..post.common import copy_model_files

    copy_model_files(init, out)
    tensors = {n: t.to("cpu") for n, t in to_hf_state_dict(rm.trunk).items()}
    tensors[SCORE] = rm.score.weight.detach().to("cpu").contiguous()
    save_safetensors(tensors, out / "model.safetensors")
    config = rm.config.to_hf_dict() | {
        "architectures": [ARCHITECTURE], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "pad_token_id": rm.pad_id, "problem_type": "regression", "torch_dtype": "float32",
    }
    atomic_write_json(out / "config.json", config)
    update_json(out / "gpt2kit.json", {"format": 1, "gpt2kit_version": __version__, "reward_model": extra})


def load_reward_model(path: str | Path, device=None) -> tuple[RewardModel, Any]:
    """(RewardModel in eval mode, its tokenizer) from a directory written by `save_reward_model` (or any
    GPT2ForSequenceClassification checkpoint with one label)."""
    from ..fileio import read_json
    from ..model import GPT2, GPT2Config
    from ..model.hf import from_hf_state_dict, read_weights
    from ..post.common import load_tokenizer

    d = require_dir(path, "reward model directory")
    cfg_file = d / "config.json"
    raw_cfg = read_json(cfg_file, "reward model config")
    if ARCHITECTURE not in (raw_cfg.get("architectures") or []):
        raise UserError(f"{cfg_file}: not a reward model (architectures should list {ARCHITECTURE}; "
                        "train one with `gpt2kit reward train`)")
    weights = read_weights(d / "model.safetensors")
    score = weights.pop(SCORE, None)
    if score is None or tuple(score.shape)[0] != 1:
        raise UserError(f"{d / 'model.safetensors'}: expected a {SCORE!r} tensor of shape [1, n_embd]")
    config = GPT2Config.from_hf_dict(raw_cfg, source=str(cfg_file))
    state = from_hf_state_dict(weights, config, source=str(d / "model.safetensors"))
    trunk = GPT2(config)
    trunk.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    pad = raw_cfg.get("pad_token_id")
    tokenizer = load_tokenizer(d)
    rm = RewardModel(trunk, tokenizer.eos_id if pad is None else pad)
    with torch.no_grad():
        rm.score.weight.copy_(score.float())
    return rm.to(device or "cpu").eval(), tokenizer


def reward_rows(pairs, tokenizer, max_len: int) -> tuple[list, list]:
    """Token rows prompt + completion (no EOS: the score is read at the completion's last token)."""
    chosen = [encode_completion(tokenizer, p.prompt, p.chosen, max_len, eos=False) for p in pairs]
    rejected = [encode_completion(tokenizer, p.prompt, p.rejected, max_len, eos=False) for p in pairs]
    return chosen, rejected


@torch.no_grad()
def score_rows(rm: RewardModel, rows: list[tuple[list[int], int]], batch_size: int = 32) -> torch.Tensor:
    was = rm.training
    rm.eval()
    out = [rm(pad_batch(rows[i: i + batch_size], rm.pad_id)[0]) for i in range(0, len(rows), batch_size)]
    rm.train(was)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score_texts(rm: RewardModel, tokenizer, prompts: list[str], completions: list[str],
                max_len: int | None = None) -> torch.Tensor:
    """Rewards [N] of (prompt, completion) strings."""
    n = max_len or rm.config.n_ctx
    return score_rows(rm, [encode_completion(tokenizer, p, c, n, eos=False) for p, c in zip(prompts, completions)])


def pair_accuracy(rm: RewardModel, chosen_rows, rejected_rows) -> dict[str, float]:
    c, r = score_rows(rm, chosen_rows), score_rows(rm, rejected_rows)
    return {"accuracy": float((c > r).float().mean()), "margin": float((c - r).mean())}


def train_reward(init: str | Path, data: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                 val_fraction: float = 0.1, overwrite: bool = False, resume: bool = False, save_every: int = 0,
                 stop_after: int | None = None, log=log_stderr) -> dict[str, Any]:
    """Bradley-Terry reward model from checkpoint `init`; OUT is a GPT2ForSequenceClassification checkpoint.
    Ctrl-C / SIGTERM (or `stop_after` steps, for tests) saves a resume checkpoint in OUT; `resume` continues it."""
    from .parallel import check_batch, join, main_only, mean_metrics, shard
    from .resume import Progress, batch_loop_state, prepare_out, restore_batch_loop

    env = join()  # torchrun: this rank's share of every batch, gradients averaged (align.parallel)
    if not env.is_main:
        log = lambda m: None  # noqa: E731 (rank 0 speaks for the job)
    o = options(overrides)
    check_batch(int(o["batch_size"]), env)
    out, state, step_dir = prepare_out(out, "reward", overwrite, resume)
    policy, tokenizer, template = load_policy(init)
    block = min(int(o["block_size"]), policy.config.n_ctx)
    train_pairs, val_pairs = split_pairs(read_pairs(data, template), val_fraction, o["seed"])
    tc, tr = reward_rows(train_pairs, tokenizer, block)
    vc, vr = reward_rows(val_pairs, tokenizer, block)
    torch.manual_seed(o["seed"])
    rm = RewardModel(policy, tokenizer.eos_id)
    if state is None:
        before = pair_accuracy(rm, vc, vr) if val_pairs else {}
    else:
        before = dict(state["before"])
        rm.load_state_dict(load_reward_model(step_dir)[0].state_dict())
    rm.train()
    opt = Optimizer(rm, o, env)
    take = cycle_batches(len(tc), int(o["batch_size"]), o["seed"] + 1)
    metrics: list[dict[str, Any]] = []
    max_steps, start = int(o["max_steps"]), 0
    if state is not None:
        metrics, start = restore_batch_loop(state, opt, take)

    def trainer_state() -> dict[str, Any]:
        return batch_loop_state(opt, take, metrics, before)

    def save_rm(d: Path) -> None:
        save_reward_model(rm, init, d, {"resume_checkpoint": True})

    t0 = time.perf_counter()
    with Progress(out, "reward", save_every, stop_after, log, env) as progress:
        for step in range(start, max_steps):
            rows = shard(take(), env)  # every rank draws the same global batch and keeps its share
            idx, _ = pad_batch([tc[i] for i in rows] + [tr[i] for i in rows], tokenizer.eos_id)
            rc, rr = rm(idx).chunk(2)
            loss = -torch.nn.functional.logsigmoid(rc - rr).mean()
            norm = opt.step(step, loss)
            m = mean_metrics({"loss": loss.item(), "accuracy": float((rc > rr).float().mean())}, env)
            metrics.append({"step": step + 1, "loss": m["loss"], "grad_norm": norm, "accuracy": m["accuracy"]})
            if progress.after_step(step + 1, max_steps, save_rm, trainer_state):
                return progress.report(step + 1)
    wall = time.perf_counter() - t0
    rm.eval()
    after = pair_accuracy(rm, vc, vr) if val_pairs else {}
    if after:
        metrics.append({"step": int(o["max_steps"]), "val/accuracy": after["accuracy"], "val/margin": after["margin"]})

    from ..fileio import atomic_dir, atomic_write_text

    extra = {"init": str(init), "data": str(data), "steps": int(o["max_steps"]), "lr": o["lr"],
             "loss": "bradley-terry", "val_accuracy": after.get("accuracy"), "processes": env.world_size}

    def write_out() -> None:
        with atomic_dir(out, overwrite=out.exists()) as tmp:
            save_reward_model(rm, init, tmp, extra)
            if template is not None:
                from .chat import save_chat_template

                save_chat_template(tmp, template)
            import json

            atomic_write_text(tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))

    main_only(env, write_out)
    log(f"reward model: {int(o['max_steps'])} steps in {wall:.1f} s"
        + (f"; held-out pair accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}" if after else ""))
    return {"out": str(out), "steps": int(o["max_steps"]), "wall_s": wall,
            **{f"val_{k}_before": v for k, v in before.items()}, **{f"val_{k}_after": v for k, v in after.items()}}
