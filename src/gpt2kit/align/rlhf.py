"""RLHF with RLOO (REINFORCE leave-one-out; Ahmadian et al. 2024): sample k completions per prompt,
score them, and push up the log-prob of those that beat the mean of their k - 1 siblings.

Per completion y of prompt x:
  R(y)  = reward(x, y) - beta * KL(y),   KL(y) = sum_t [log pi(y_t | .) - log pi_ref(y_t | .)] (sequence KL)
  A(y)  = R(y) - mean of R over the other k - 1 samples of x           (the leave-one-out baseline)
  loss  = -mean_y A(y) * sum_t log pi(y_t | .)
With --kl-target, beta adapts after every step (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1,
-0.2, 0.2) * batch / horizon. Sampling uses gpt2kit.generate (batched, KV-cached). The reward is a reward
model directory (`gpt2kit reward train`; its tokenizer must be the policy's) or `module:function`, a
Python function (prompts: list[str], completions: list[str]) -> list[float].
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, require_file
from ..fileio import iter_jsonl
from .loop import Optimizer, check_out, load_policy, log_stderr, options, write_result
from .pairs import pad_batch, token_logps

RewardFn = Callable[[list[str], list[str]], list[float]]


def load_reward(spec: str, policy_tokenizer) -> RewardFn:
    """A reward model directory, or `module:function`."""
    if Path(spec).is_dir():
        from .reward import load_reward_model, score_texts

        rm, tok = load_reward_model(spec)
        if tok.fingerprint != policy_tokenizer.fingerprint:
            raise UserError(f"{Path(spec) / 'vocab.json'}: the reward model's tokenizer is not the policy's "
                            f"(fingerprint {tok.fingerprint[:12]} vs {policy_tokenizer.fingerprint[:12]}); "
                            "train the reward model from the same base checkpoint")
        return lambda prompts, completions: score_texts(rm, tok, prompts, completions).tolist()
    module, _, name = spec.partition(":")
    if not name:
        raise UserError(f"--reward {spec!r}: expected a reward model directory or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--reward {spec!r}: cannot import it ({e})") from None
    return fn


def read_prompts(path: str | Path | None, template: str | None) -> list[str]:
    """Prompts from JSONL records with a "prompt" field (a string or chat messages); None: one empty
    prompt (sampling starts from end-of-text)."""
    if path is None:
        return [""]
    from .chat import apply_chat_template

    p = require_file(path, "--prompts file")
    out = []
    for lineno, obj in iter_jsonl(p):
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if isinstance(prompt, list):
            try:
                prompt = apply_chat_template(prompt, template, add_generation_prompt=True)
            except UserError as e:
                raise UserError(f"{p}:{lineno}: prompt: {e}") from None
        if not isinstance(prompt, str):
            raise UserError(f"{p}:{lineno}: expected an object with a string (or chat messages) field 'prompt'")
        out.append(prompt)
    if not out:
        raise UserError(f"{p}: no records")
    return out


def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, temperature: float = 1.0,
           max_prompt: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids up to and including EOS) of one sampled completion per prompt."""
    from ..generate import generate

    eos = tokenizer.eos_id
    limit = max_prompt or (model.config.n_ctx - max_new_tokens)
    rows = [(list(tokenizer.encode(p, allowed_special="all")) or [eos])[-limit:] for p in prompts]
    was = model.training
    model.eval()
    with torch.no_grad():
        out = generate(model, rows, max_new_tokens, temperature=temperature, eos_id=eos, pad_id=eos, seed=seed)
    model.train(was)
    width = max(len(r) for r in rows)
    completions = []
    for row in out[:, width:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        completions.append(row[:cut])
    return rows, completions


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[N] rewards grouped k per prompt (consecutive) -> reward minus the mean of the group's others."""
    g = rewards.view(-1, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).view(-1)


def _mean_reward(model, tokenizer, reward_fn, prompts, n, max_new, seed) -> float:
    picks = [prompts[i % len(prompts)] for i in range(n)]
    rows, comps = sample(model, tokenizer, picks, max_new, seed)
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in comps]
    return float(torch.tensor(reward_fn(picks, texts), dtype=torch.float32).mean())


def train_rloo(init: str | Path, reward: str | RewardFn, out: str | Path, prompts_file: str | Path | None = None,
               k: int = 4, beta: float = 0.05, kl_target: float | None = None, kl_horizon: int = 10000,
               max_new_tokens: int = 32, overrides: dict[str, Any] | None = None, eval_samples: int = 64,
               overwrite: bool = False, log=log_stderr) -> dict[str, Any]:
    """RLOO from checkpoint `init`; OUT is the new checkpoint (+ metrics.jsonl). batch_size = prompts per step."""
    if k < 2:
        raise UserError(f"--k must be at least 2 (the baseline leaves one out), got {k}")
    if beta < 0:
        raise UserError(f"--beta must be >= 0, got {beta}")
    o = options(overrides, batch_size=4, lr=1e-5)
    out = check_out(out, overwrite)
    model, tokenizer, template = load_policy(init)
    reward_fn = load_reward(reward, tokenizer) if isinstance(reward, str) else reward
    prompts = read_prompts(prompts_file, template)
    if max_new_tokens < 1 or max_new_tokens >= model.config.n_ctx:
        raise UserError(f"--max-new-tokens must be in [1, {model.config.n_ctx}), got {max_new_tokens}")
    reference, _, _ = load_policy(init)  # frozen: the KL penalty is measured against it on fresh samples
    reference.requires_grad_(False).eval()
    eos = tokenizer.eos_id
    seed = int(o["seed"])
    before = _mean_reward(model, tokenizer, reward_fn, prompts, eval_samples, max_new_tokens, seed + 10**6)

    torch.manual_seed(seed)
    model.train()
    opt = Optimizer(model, o)
    import random

    rng = random.Random(seed)
    metrics: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for step in range(int(o["max_steps"])):
        picks = [rng.choice(prompts) for _ in range(int(o["batch_size"]))]
        group = [p for p in picks for _ in range(k)]  # k consecutive samples per prompt
        rows, comps = sample(model, tokenizer, group, max_new_tokens, seed + step)
        texts = [tokenizer.decode([t for t in c if t != eos]) for c in comps]
        scores = torch.tensor(reward_fn(group, texts), dtype=torch.float32)
        idx, mask = pad_batch([(r + c, len(r)) for r, c in zip(rows, comps)], eos)
        m = mask[:, 1:].float()
        logp = token_logps(model, idx)
        with torch.no_grad():
            ref_logp = token_logps(reference, idx)
        kl = ((logp.detach() - ref_logp) * m).sum(-1)
        total = scores - beta * kl
        adv = rloo_advantages(total, k)
        loss = -(adv * (logp * m).sum(-1)).mean()
        norm = opt.step(step, loss)
        row = {"step": step + 1, "loss": loss.item(), "grad_norm": norm, "reward": scores.mean().item(),
               "kl": kl.mean().item(), "beta": beta, "completion_tokens": m.sum(-1).mean().item()}
        metrics.append(row)
        if kl_target:
            err = max(-0.2, min(0.2, kl.mean().item() / kl_target - 1))
            beta *= 1 + err * len(group) / kl_horizon
        if (step + 1) % 10 == 0:
            log(f"step {step + 1}: reward {row['reward']:.3f}, kl {row['kl']:.3f}, beta {row['beta']:.4f}")
    wall = time.perf_counter() - t0
    after = _mean_reward(model, tokenizer, reward_fn, prompts, eval_samples, max_new_tokens, seed + 10**6)
    metrics.append({"step": int(o["max_steps"]), "val/reward_before": before, "val/reward_after": after})
    extra = {"rlhf": {"init": str(init), "algorithm": "rloo", "reward": reward if isinstance(reward, str) else "python",
                      "k": k, "beta": beta, "kl_target": kl_target, "steps": int(o["max_steps"]), "lr": o["lr"]}}
    write_result(out, init, model, metrics, extra, overwrite, chat_template=template)
    log(f"RLOO: {int(o['max_steps'])} steps in {wall:.1f} s; mean reward of fresh samples {before:.3f} -> {after:.3f}")
    recent = metrics[-11:-1] or metrics[:-1]
    return {"out": str(out), "steps": int(o["max_steps"]), "wall_s": wall, "reward_before": before,
            "reward_after": after, "kl_last": sum(r["kl"] for r in recent) / max(len(recent), 1), "beta_final": beta}
