"""RLHF: RLOO (REINFORCE leave-one-out; Ahmadian et al. 2024) or PPO (align.ppo), with a KL penalty to
the frozen starting checkpoint whose coefficient is fixed or adapted (align.kl).

Each step samples `batch_size` prompts and `k` completions of each (gpt2kit.generate: batched,
KV-cached, temperature 1, stop at EOS), scores them, and measures the per-token KL to the reference (a
frozen, gradient-free copy of --init: no optimizer state, no second trainable model).
RLOO, per completion y of prompt x:
  R(y)  = reward(x, y) - kl_coef * KL(y),   KL(y) = sum_t kl_t (the per-token KL summed: TRL's RLOO)
  A(y)  = R(y) - mean of R over the other k - 1 samples of x           (the leave-one-out baseline)
  loss  = -mean_y A(y) * sum_t log pi(y_t | .)
PPO: the per-token KL is a per-token reward, GAE on a value head, clipped policy and value losses,
several epochs over minibatches of each rollout (align.ppo).
With an adaptive controller, kl_coef moves after every step toward the KL target (Ziegler et al. 2019).
The reward is a reward model directory (`gpt2kit reward train`; its tokenizer must be the policy's) or
`module:function`, a Python function (prompts: list[str], completions: list[str]) -> list[float].
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
from .loop import Optimizer, load_policy, log_stderr, options, save_policy, write_result
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



ALGORITHMS = ("rloo", "ppo")


def _mean_reward(model, tokenizer, reward_fn, prompts, n, max_new, seed) -> float:
    picks = [prompts[i % len(prompts)] for i in range(n)]
    rows, comps = sample(model, tokenizer, picks, max_new, seed)
    texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_id]) for c in comps]
    return float(_scores(reward_fn, picks, texts).mean())


def _scores(reward_fn: RewardFn, prompts: list[str], texts: list[str]) -> torch.Tensor:
    got = reward_fn(prompts, texts)
    scores = torch.as_tensor(got, dtype=torch.float32).flatten()
    if scores.numel() != len(texts):
        raise UserError(f"--reward returned {scores.numel()} scores for {len(texts)} completions")
    if not torch.isfinite(scores).all():
        raise UserError("--reward returned a score that is not finite (nan or inf)")
    return scores


def rollout(model, reference, tokenizer, reward_fn: RewardFn, group: list[str], max_new_tokens: int,
            seed: int, keep: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one completion per prompt of `group` and score it: (ids [N, T] prompt + completion, right-padded;
    completion mask [N, T - 1] aligned with token log-probs; scores [N]; reference token log-probs [N, T - 1]).
    keep: only these samples are scored and returned (a torchrun rank's share; all are sampled, so that
    every sample is the one a single process draws)."""
    eos = tokenizer.eos_id
    rows, comps = sample(model, tokenizer, group, max_new_tokens, seed)
    if keep is not None:
        group, rows, comps = group[keep], rows[keep], comps[keep]
    texts = [tokenizer.decode([t for t in c if t != eos]) for c in comps]
    scores = _scores(reward_fn, group, texts)
    idx, mask = pad_batch([(r + c, len(r)) for r, c in zip(rows, comps)], eos)
    with torch.no_grad():
        ref_logps = token_logps(reference, idx)
    return idx, mask[:, 1:], scores, ref_logps


def rloo_update(model, opt, step: int, idx, mask, scores, ref_logps, kl_coef: float, k: int,
                kl_estimator: str = "k1") -> dict[str, float]:
    """One REINFORCE-leave-one-out step on a rollout of k consecutive samples per prompt."""
    from .kl import per_token_kl

    m = mask.float()
    logp = token_logps(model, idx)
    kl = (per_token_kl(logp.detach(), ref_logps, kl_estimator) * m).sum(-1)
    adv = rloo_advantages(scores - kl_coef * kl, k)
    loss = -(adv * (logp * m).sum(-1)).mean()
    norm = opt.step(step, loss)
    return {"loss": loss.item(), "grad_norm": norm, "kl": kl.mean().item()}


def train_rlhf(init: str | Path, reward: str | RewardFn, out: str | Path, algo: str = "rloo",
               prompts_file: str | Path | None = None, k: int = 4, kl_coef: float = 0.05,
               kl_target: float | None = None, kl_horizon: int = 10000, adaptive_kl: bool | None = None,
               kl_estimator: str = "k1", ppo=None, max_new_tokens: int = 32,
               overrides: dict[str, Any] | None = None, eval_samples: int = 64, overwrite: bool = False,
               resume: bool = False, save_every: int = 0, stop_after: int | None = None,
               log=log_stderr) -> dict[str, Any]:
    """RLOO or PPO from checkpoint `init`; OUT is the new checkpoint (+ metrics.jsonl). batch_size = prompts
    per step, k samples each. adaptive_kl None: adaptive when kl_target is given."""
    from .kl import KL_ESTIMATORS, kl_controller
    from .parallel import check_batch, join, main_only, mean_metrics
    from .ppo import PolicyWithValue, PPOConfig, ppo_update
    from .resume import Progress, prepare_out, restore_rng, rng_state

    env = join()  # torchrun (RLOO): each rank updates on its share of the prompts (align.parallel)
    if not env.is_main:
        log = lambda m: None  # noqa: E731 (rank 0 speaks for the job)
    if algo == "ppo" and env.world_size > 1:
        # its advantages are whitened over the whole rollout and its minibatches shuffled across it
        raise UserError(f"rlhf --algo ppo runs in one process; under torchrun use --algo rloo or start it with "
                        f"--nproc_per_node=1 (got WORLD_SIZE={env.world_size})")
    if algo not in ALGORITHMS:
        raise UserError(f"--algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    if k < (2 if algo == "rloo" else 1):
        raise UserError(f"--k must be at least {2 if algo == 'rloo' else 1}"
                        f"{' (the baseline leaves one out)' if algo == 'rloo' else ''}, got {k}")
    if kl_estimator not in KL_ESTIMATORS:
        raise UserError(f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}, got {kl_estimator!r}")
    ctl = kl_controller(kl_coef, kl_target, kl_horizon, kl_target is not None if adaptive_kl is None else adaptive_kl)
    cfg = ppo or PPOConfig()
    o = options(overrides, batch_size=4, lr=1e-5)
    check_batch(int(o["batch_size"]), env)
    share = int(o["batch_size"]) // env.world_size * k  # samples per rank: whole groups of k
    keep = slice(env.rank * share, (env.rank + 1) * share) if env.world_size > 1 else None
    out, state, step_dir = prepare_out(out, "rlhf-" + algo, overwrite, resume)
    model, tokenizer, template = load_policy(init)
    reward_fn = load_reward(reward, tokenizer) if isinstance(reward, str) else reward
    prompts = read_prompts(prompts_file, template)
    if max_new_tokens < 1 or max_new_tokens >= model.config.n_ctx:
        raise UserError(f"--max-new-tokens must be in [1, {model.config.n_ctx}), got {max_new_tokens}")
    reference, _, _ = load_policy(init)  # frozen, no gradients, no optimizer state: log-probs only
    reference.requires_grad_(False).eval()
    seed, max_steps = int(o["seed"]), int(o["max_steps"])
    if state is None:
        before = _mean_reward(model, tokenizer, reward_fn, prompts, eval_samples, max_new_tokens, seed + 10**6)
    else:
        model, _, _ = load_policy(step_dir)
        before = float(state["before"])
    torch.manual_seed(seed)
    model.eval()  # no dropout: the log-probs of a rollout and of its update are of the same network (TRL)
    trained = PolicyWithValue(model) if algo == "ppo" else model
    opt = Optimizer(trained, o, env)
    import random

    rng = random.Random(seed)
    metrics: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ctl.load_state_dict(state["kl_controller"])
        restore_rng(state["rng"], rng)
        metrics = list(state["metrics"])
        start = int(state["step"])
        if algo == "ppo":
            trained.value_head.load_state_dict(state["value_head"])

    def trainer_state() -> dict[str, Any]:
        s = {"optimizer": opt.state_dict(), "kl_controller": ctl.state_dict(), "rng": rng_state(rng),
             "metrics": metrics, "before": before}
        if algo == "ppo":
            s["value_head"] = trained.value_head.state_dict()
        return s

    t0 = time.perf_counter()
    with Progress(out, "rlhf-" + algo, save_every, stop_after, log, env) as progress:
        for step in range(start, max_steps):
            picks = [rng.choice(prompts) for _ in range(int(o["batch_size"]))]
            group = [p for p in picks for _ in range(k)]  # k consecutive samples per prompt
            idx, mask, scores, ref_logps = rollout(model, reference, tokenizer, reward_fn, group, max_new_tokens,
                                                   seed + step, keep)
            coef = ctl.value
            if algo == "ppo":
                row = ppo_update(trained, opt, step, idx, mask, scores, ref_logps, coef, cfg, seed + step, kl_estimator)
            else:
                row = rloo_update(model, opt, step, idx, mask, scores, ref_logps, coef, k, kl_estimator)
            row = mean_metrics({**row, "reward": scores.mean().item(),
                                "completion_tokens": mask.float().sum(-1).mean().item()}, env)
            row = {"step": step + 1, **{key: v for key, v in row.items() if key != "completion_tokens"},
                   "kl_coef": coef, "completion_tokens": row["completion_tokens"]}
            metrics.append(row)
            ctl.update(row["kl"], len(group))
            if (step + 1) % 10 == 0:
                log(f"step {step + 1}: reward {row['reward']:.3f}, kl {row['kl']:.3f}, kl_coef {coef:.4f}")
            if progress.after_step(step + 1, max_steps, lambda d: save_policy(init, model, d), trainer_state):
                return progress.report(step + 1)
    wall = time.perf_counter() - t0
    after = _mean_reward(model, tokenizer, reward_fn, prompts, eval_samples, max_new_tokens, seed + 10**6)
    metrics.append({"step": max_steps, "val/reward_before": before, "val/reward_after": after})
    extra = {"rlhf": {"init": str(init), "algorithm": algo, "reward": reward if isinstance(reward, str) else "python",
                      "k": k, "kl_coef_final": ctl.value, "adaptive_kl": ctl.adaptive,
                      "kl_target": getattr(ctl, "target", None), "kl_estimator": kl_estimator, "steps": max_steps,
                      "lr": o["lr"], **({"ppo": vars(cfg)} if algo == "ppo" else {})}}
    extra["rlhf"]["processes"] = env.world_size
    main_only(env, lambda: write_result(out, init, model, metrics, extra, overwrite=out.exists(),
                                        chat_template=template))
    log(f"{algo.upper()}: {max_steps - start} steps in {wall:.1f} s; mean reward of fresh samples "
        f"{before:.3f} -> {after:.3f}")
    recent = [r for r in metrics if "kl" in r][-10:]
    return {"out": str(out), "steps": max_steps, "wall_s": wall, "reward_before": before, "reward_after": after,
            "kl_last": sum(r["kl"] for r in recent) / max(len(recent), 1), "kl_max": max(r["kl"] for r in recent),
            "kl_coef_final": ctl.value}


def train_rloo(init: str | Path, reward: str | RewardFn, out: str | Path, prompts_file: str | Path | None = None,
               k: int = 4, beta: float = 0.05, kl_target: float | None = None, kl_horizon: int = 10000,
               **kw: Any) -> dict[str, Any]:
    """RLOO (train_rlhf with algo="rloo"; `beta` is the KL coefficient, TRL's RLOO name)."""
    return train_rlhf(init, reward, out, "rloo", prompts_file, k, beta, kl_target, kl_horizon, **kw)
