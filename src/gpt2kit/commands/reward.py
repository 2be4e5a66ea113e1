"""Reward models: train one on preference pairs (Bradley-Terry), or score with one.

  gpt2kit reward train --init SFT --data pairs.jsonl --out RM
  gpt2kit reward train ... --resume                        # continue an interrupted run
  torchrun --standalone --nproc_per_node=2 -m gpt2kit reward train ...   # data parallel (Gloo)
  gpt2kit reward score --rm RM --data pairs.jsonl          # held-out style pair accuracy of any pairs file
  gpt2kit reward score --rm RM --prompt "Q: ..." --completion " A ..."

RM is a GPT2ForSequenceClassification checkpoint (transformers opens it and gives the same scores).
See docs/align.md.
"""

from __future__ import annotations

import argparse

from ..align.defaults import ALIGN_DEFAULTS, ALIGN_FLAGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..post.common import add_train_flags

    sub = p.add_subparsers(dest="action", metavar="<action>", required=True, parser_class=type(p))
    t = sub.add_parser("train", help="train a reward model on preference pairs")
    t.add_argument("--init", required=True, metavar="CKPT", help="checkpoint whose trunk the reward model starts from")
    t.add_argument("--data", required=True, metavar="FILE", help="preference pairs JSONL (prompt, chosen, rejected)")
    t.add_argument("--out", required=True, metavar="DIR", help="reward model directory to write")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs held out (default 0.1)")
    t.add_argument("--save-every", type=int, default=0, help="steps between resume checkpoints (0: on Ctrl-C only)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace an --out that is not empty")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    add_train_flags(t, ALIGN_DEFAULTS, only=ALIGN_FLAGS)
    s = sub.add_parser("score", help="score completions, or the pair accuracy of a pairs file")
    s.add_argument("--rm", required=True, metavar="DIR", help="reward model directory")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", metavar="FILE", help="preference pairs JSONL: accuracy and mean margin")
    g.add_argument("--completion", action="append", metavar="TEXT", help="a completion to score (repeatable)")
    s.add_argument("--prompt", default="", help="the prompt of --completion")
    s.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..post.common import print_report

    if args.action == "train":
        from ..align.parallel import job
        from ..align.reward import train_reward
        from ..hub import resolve_checkpoint
        from ..post.common import train_overrides

        with job() as env:  # under torchrun: data parallel, rank 0 writes and reports
            report = train_reward(resolve_checkpoint(args.init, "--init"), args.data, args.out,
                                  train_overrides(args), val_fraction=args.val_fraction, overwrite=args.overwrite,
                                  resume=args.resume, save_every=args.save_every)
        if env.is_main:
            print_report(report, args.json)
        return 0
    from ..align.chat import load_chat_template
    from ..align.pairs import read_pairs
    from ..align.reward import load_reward_model, pair_accuracy, reward_rows, score_texts

    rm, tok = load_reward_model(args.rm)
    if args.data:
        c, r = reward_rows(read_pairs(args.data, load_chat_template(args.rm)), tok, rm.config.n_ctx)
        print_report({"pairs": len(c), **pair_accuracy(rm, c, r)}, args.json)
        return 0
    scores = score_texts(rm, tok, [args.prompt] * len(args.completion), args.completion).tolist()
    print_report({f"score[{i}]": s for i, s in enumerate(scores)}, args.json)
    return 0
