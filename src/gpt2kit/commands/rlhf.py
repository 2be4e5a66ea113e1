"""RLHF with RLOO: sample k completions per prompt, reward them, and reinforce those that beat their
siblings, with a KL penalty to the starting checkpoint.

  gpt2kit rlhf --init SFT --reward RM --out POLICY [--prompts prompts.jsonl --k 4 --beta 0.05 --kl-target 6]
  gpt2kit rlhf --init SFT --reward mymodule:score --out POLICY

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
    p.add_argument("--prompts", metavar="FILE", help="JSONL with a 'prompt' field per line")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--beta", type=float, default=0.05, help="KL penalty coefficient (default 0.05)")
    p.add_argument("--kl-target", type=float, default=None, help="adapt beta so the KL per sample nears this")
    p.add_argument("--max-new-tokens", type=int, default=32, help="length limit of a sample (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that is not empty")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_train_flags(p, ALIGN_DEFAULTS | {"batch_size": 4, "lr": 1e-5}, only=ALIGN_FLAGS)


def run(args: argparse.Namespace) -> int:
    from ..align.rlhf import train_rloo
    from ..hub import resolve_checkpoint
    from ..post.common import print_report, train_overrides

    report = train_rloo(resolve_checkpoint(args.init, "--init"), args.reward, args.out, prompts_file=args.prompts,
                        k=args.k, beta=args.beta, kl_target=args.kl_target, max_new_tokens=args.max_new_tokens,
                        overrides=train_overrides(args), overwrite=args.overwrite)
    print_report(report, args.json)
    return 0
