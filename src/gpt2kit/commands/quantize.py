"""Quantize a checkpoint's weights to int8 or int4 (scale + zero point per output channel or per group).

  gpt2kit quantize CKPT --bits 8 --out CKPT-int8                   # per output channel
  gpt2kit quantize CKPT --bits 4 --group-size 64 --out CKPT-int4    # groups of 64 input columns
  gpt2kit quantize CKPT --bits 8 --out Q --eval-text valid.txt --speed-tokens 64   # measure the effect

The output directory loads with `GPT2.from_pretrained` and runs in `gpt2kit eval` and `gpt2kit generate`.
The token and position embeddings (and so the tied head) are quantized per row too unless
--keep-embeddings. See docs/post.md.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="float checkpoint directory (gpt2kit or Hugging Face GPT-2)")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="bits per weight")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per scale/zero point (default: int8 one per output channel, int4 64)")
    p.add_argument("--symmetric", action="store_true", help="zero point fixed at the middle code (no offset)")
    p.add_argument("--keep-embeddings", action="store_true",
                   help="leave the token/position embeddings (and tied head) in float32")
    p.add_argument("--out", required=True, metavar="DIR", help="the quantized checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval-text", metavar="FILE", help="report perplexity on this text before and after")
    p.add_argument("--eval-tokens", type=int, default=None, help="only the first N tokens of --eval-text")
    p.add_argument("--speed-tokens", type=int, default=0,
                   help="report greedy generation speed (new tokens/s, batch 1) over N tokens, before and after")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserError
    from ..hub import resolve_checkpoint
    from ..post.common import print_report, read_eval_text
    from ..post.quantize import QuantSpec, quantize_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.speed_tokens < 0:
        raise UserError(f"--speed-tokens must be >= 0, got {args.speed_tokens}")
    spec = QuantSpec.default(args.bits, args.group_size, args.symmetric, not args.keep_embeddings)
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a hub id works too
    report = quantize_checkpoint(
        args.checkpoint, args.out, spec, eval_text=read_eval_text(args.eval_text), eval_tokens=args.eval_tokens,
        speed_tokens=args.speed_tokens, overwrite=args.overwrite,
    )
    print_report(report, args.json)
    return 0
