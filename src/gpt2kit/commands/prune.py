"""Magnitude-prune a checkpoint's projection matrices to a target sparsity; the masks are saved with it.

  gpt2kit prune CKPT --sparsity 0.3 --out CKPT-pruned              # global threshold (default)
  gpt2kit prune CKPT --sparsity 0.5 --scope layer --out P --eval-text valid.txt

Pruned: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj weights of every block (not embeddings, layer
norms or biases). `gpt2kit finetune --init P ...` keeps the pruned weights at zero. See docs/post.md.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="float checkpoint directory")
    p.add_argument("--sparsity", type=float, required=True, help="share of the pruned tensors' weights to zero, in [0, 1)")
    p.add_argument("--scope", choices=["global", "layer"], default="global",
                   help="one threshold over all tensors (global, default) or the same share per tensor (layer)")
    p.add_argument("--out", required=True, metavar="DIR", help="the pruned checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval-text", metavar="FILE", help="report perplexity on this text before and after")
    p.add_argument("--eval-tokens", type=int, default=None, help="only the first N tokens of --eval-text")
    p.add_argument("--per-tensor", action="store_true", help="also list the sparsity of each tensor")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..post.prune import check_sparsity

    check_sparsity(args.sparsity)  # before any heavy import or file work
    import torch

    from ..hub import resolve_checkpoint
    from ..post.common import print_report, read_eval_text
    from ..post.prune import prune_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    args.checkpoint = str(resolve_checkpoint(args.checkpoint))  # a hub id works too
    report = prune_checkpoint(args.checkpoint, args.out, args.sparsity, args.scope,
                              eval_text=read_eval_text(args.eval_text), eval_tokens=args.eval_tokens,
                              overwrite=args.overwrite)
    if not args.per_tensor and not args.json:
        report.pop("per_tensor")
    print_report(report, args.json)
    return 0
