"""Direct Preference Optimization of a checkpoint on preference pairs (TRL's losses and metric names).

  gpt2kit dpo --init SFT --data pairs.jsonl --out DPO [--beta 0.1 --loss sigmoid|ipo|hinge]
  gpt2kit dpo ... --resume          # continue an interrupted run (Ctrl-C / SIGTERM saves OUT/step-XXXXXX)
  torchrun --standalone --nproc_per_node=2 -m gpt2kit dpo ...   # data parallel (Gloo), = one process

pairs.jsonl: {"prompt": str or chat messages, "chosen": str, "rejected": str} per line. The reference is
--init itself: its log-probs are computed once before training (one model in memory). OUT is a
checkpoint (+ metrics.jsonl with rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies).
See docs/align.md.
"""

from __future__ import annotations

import argparse

from ..align.defaults import ALIGN_DEFAULTS, ALIGN_FLAGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..post.common import add_train_flags

    p.add_argument("--init", required=True, metavar="CKPT", help="the (SFT) checkpoint: policy and reference")
    p.add_argument("--data", required=True, metavar="FILE", help="preference pairs JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference (default 0.1)")
    p.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo", "hinge"), help="DPO loss (default sigmoid)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs held out (default 0.1)")
    p.add_argument("--save-every", type=int, default=0, help="steps between resume checkpoints (0: on Ctrl-C only)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that is not empty")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_train_flags(p, ALIGN_DEFAULTS, only=ALIGN_FLAGS)


def run(args: argparse.Namespace) -> int:
    from ..align.dpo import train_dpo
    from ..align.parallel import job
    from ..hub import resolve_checkpoint
    from ..post.common import print_report, train_overrides

    with job() as env:  # under torchrun: data parallel, rank 0 writes and reports
        report = train_dpo(resolve_checkpoint(args.init, "--init"), args.data, args.out, beta=args.beta,
                           loss_type=args.loss, overrides=train_overrides(args), val_fraction=args.val_fraction,
                           overwrite=args.overwrite, resume=args.resume, save_every=args.save_every)
    if env.is_main:
        print_report(report, args.json)
    return 0
