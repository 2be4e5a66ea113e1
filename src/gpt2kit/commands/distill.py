"""Distil a teacher checkpoint into a student trained from scratch on token shards.

  gpt2kit distill --teacher CKPT --student gpt2-tiny --data SHARDS --out RUN [--alpha 0.5 --temperature 1]
  gpt2kit distill --teacher CKPT --student student_config.json --data SHARDS --out RUN --max-steps 1000

loss = alpha * CE + (1 - alpha) * tau^2 * KL(q_tau || p_tau), teacher frozen; teacher and shards must
share one tokenizer (fingerprint). RUN is a gpt2kit run directory (checkpoints, best/, metrics.jsonl);
validation is the student's plain cross-entropy, comparable with `gpt2kit train` on the same shards.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..post.common import add_train_flags

    p.add_argument("--teacher", required=True, metavar="CKPT", help="the teacher checkpoint directory")
    p.add_argument("--student", required=True, metavar="PRESET|CONFIG",
                   help="student shape: a preset (gpt2-tiny, gpt2-mini, ...) or a config.json / checkpoint dir")
    p.add_argument("--data", required=True, metavar="SHARDS", help="token shards (the teacher's tokenizer)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE (default 0.5)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature tau (default 1: measured better than 2 for short runs, docs/post.md)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that holds checkpoints")
    p.add_argument("--eval-text", metavar="FILE", help="report teacher and student perplexity on this text")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_train_flags(p, {})


def run(args: argparse.Namespace) -> int:
    from ..hub import resolve_checkpoint
    from ..post.common import print_report, read_eval_text, train_overrides
    from ..post.distill import distill

    args.teacher = str(resolve_checkpoint(args.teacher, "--teacher"))  # a hub id works too
    text = read_eval_text(args.eval_text)
    result = distill(args.teacher, args.student, args.data, args.out, alpha=args.alpha, tau=args.temperature,
                     overrides=train_overrides(args), overwrite=args.overwrite)
    report = {"out": str(result.run_dir), "checkpoint": str(result.last_checkpoint), "steps": result.step,
              "train_loss": result.train_loss, "tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s}
    if result.val:
        report["val_loss"] = result.val["val_loss"]
    if text is not None:
        from ..model import GPT2
        from ..post.common import load_tokenizer, perplexity, weights_size

        tok = load_tokenizer(args.teacher)
        report["teacher_ppl"] = perplexity(GPT2.from_pretrained(args.teacher), tok, text)["ppl"]
        report["student_ppl"] = perplexity(GPT2.from_pretrained(result.last_checkpoint), tok, text)["ppl"]
        report["teacher_size"] = weights_size(args.teacher)
        report["student_size"] = weights_size(result.last_checkpoint)
    print_report(report, args.json)
    return 0
