"""RLHF: sample completions, reward them, and move the policy toward the high-reward ones (RLOO or PPO),
with a per-token KL penalty to the starting checkpoint (fixed, or adapted toward --kl-target).

  gpt2kit rlhf --init SFT --reward RM --out POLICY [--algo rloo|ppo --prompts prompts.jsonl --k 4]
  gpt2kit rlhf --init SFT --reward RM --out POLICY --algo ppo --kl-coef 0.2 --adaptive-kl --kl-target 6
  gpt2kit rlhf --init SFT --reward mymodule:score --out POLICY
  gpt2kit rlhf ... --resume                     # continue an interrupted run (Ctrl-C / SIGTERM save)
  torchrun --standalone --nproc_per_node=2 -m gpt2kit rlhf ... --algo rloo   # data parallel (Gloo)

--reward: a reward model directory (`gpt2kit reward train`, same tokenizer as --init) or module:function
with (prompts: list[str], completions: list[str]) -> list[float]. --prompts: JSONL with a "prompt" field
(a pairs file works); without it, sampling starts from end-of-text. See docs/align.md.
"""

from __future__ import annotations

import argparse

from ..align.defaults import ALIGN_DEFAULTS, ALIGN_FLAGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..post.common import add_train_flags

    p.add_argument("--init", required=True, metavar="CKPT", help="the (SFT) checkpoint: policy and KL reference")
    p.add_argument("--reward", required=True, metavar="RM|MODULE:FUNCTION", help="reward model or Python function")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--algo", choices=("rloo", "ppo"), default="rloo", help="RL algorithm (default rloo)")
    p.add_argument("--prompts", metavar="FILE", help="JSONL with a 'prompt' field per line")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    k = p.add_argument_group("KL penalty")
    k.add_argument("--kl-coef", "--beta", dest="kl_coef", type=float, default=0.05,
                   help="KL penalty coefficient, the start value when adaptive (default 0.05)")
    k.add_argument("--adaptive-kl", action=argparse.BooleanOptionalAction, default=None,
                   help="adapt --kl-coef toward --kl-target (Ziegler et al.; default: on when --kl-target is given)")
    k.add_argument("--kl-target", type=float, default=None, help="target KL per sample, nats (adaptive default 6)")
    k.add_argument("--kl-horizon", type=int, default=10000, help="the controller's horizon in samples (default 10000)")
    k.add_argument("--kl-estimator", choices=("k1", "k3"), default="k1", help="per-token KL estimate (default k1)")
    g = p.add_argument_group("PPO (--algo ppo; TRL's defaults)")
    g.add_argument("--gamma", type=float, default=1.0, help="discount (default 1.0)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default 0.95)")
    g.add_argument("--cliprange", type=float, default=0.2, help="policy ratio clip (default 0.2)")
    g.add_argument("--cliprange-value", type=float, default=0.2, help="value clip (default 0.2)")
    g.add_argument("--vf-coef", type=float, default=0.1, help="value loss weight (default 0.1)")
    g.add_argument("--ppo-epochs", type=int, default=4, help="passes over each rollout (default 4)")
    g.add_argument("--num-minibatches", type=int, default=1, help="minibatches per pass (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length limit of a sample (default 32)")
    p.add_argument("--save-every", type=int, default=0, help="steps between resume checkpoints (0: on Ctrl-C only)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that is not empty")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_train_flags(p, ALIGN_DEFAULTS | {"batch_size": 4, "lr": 1e-5}, only=ALIGN_FLAGS)


def ppo_config(args: argparse.Namespace):
    from ..align.ppo import PPOConfig
    from ..errors import UserError

    for name in ("ppo_epochs", "num_minibatches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("cliprange", "cliprange_value", "vf_coef"):
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1):
        raise UserError(f"--gamma and --lam must be in [0, 1], got {args.gamma} and {args.lam}")
    return PPOConfig(gamma=args.gamma, lam=args.lam, cliprange=args.cliprange, cliprange_value=args.cliprange_value,
                     vf_coef=args.vf_coef, ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches)


def run(args: argparse.Namespace) -> int:
    from ..align.parallel import job
    from ..align.rlhf import train_rlhf
    from ..hub import resolve_checkpoint
    from ..post.common import print_report, train_overrides

    with job() as env:  # under torchrun (RLOO): data parallel, rank 0 writes and reports
        report = train_rlhf(resolve_checkpoint(args.init, "--init"), args.reward, args.out, algo=args.algo,
                            prompts_file=args.prompts, k=args.k, kl_coef=args.kl_coef, kl_target=args.kl_target,
                            kl_horizon=args.kl_horizon, adaptive_kl=args.adaptive_kl,
                            kl_estimator=args.kl_estimator, ppo=ppo_config(args), max_new_tokens=args.max_new_tokens,
                            overrides=train_overrides(args), overwrite=args.overwrite, resume=args.resume,
                            save_every=args.save_every)
    if env.is_main:
        print_report(report, args.json)
    return 0
