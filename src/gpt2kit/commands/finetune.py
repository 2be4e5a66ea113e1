"""Fine-tune a checkpoint on new data: token shards, or prompt/completion JSONL (loss on the completion only).

  gpt2kit finetune --init CKPT --data SHARDS --out RUN [--lr 1e-4 --max-steps 200 --block-size 256]
  gpt2kit finetune --init CKPT --jsonl pairs.jsonl --out RUN [--val-fraction 0.1]
  gpt2kit finetune --init PRUNED --data SHARDS --out RUN        # pruned weights stay zero
  gpt2kit finetune --init CKPT --data SHARDS --out RUN --lora-r 8 --lora-alpha 16 [--lora-targets c_attn,c_proj,c_fc]
                                                                # adapters only (peft's format); --lora-merge

Shards use gpt2kit's trainer (RUN is a run directory: step-XXXXXX/ checkpoints, best/, metrics.jsonl);
JSONL records {"prompt": ..., "completion": ...} become padded rows prompt + completion + EOS, and the
fine-tuned checkpoint is RUN/final (Ctrl-C / SIGTERM saves RUN/step-XXXXXX; --resume continues it exactly). The report gives validation loss (and --eval-text perplexity)
before and after. See docs/post.md.
"""

from __future__ import annotations

import argparse

from ..post.finetune_defaults import DEFAULTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..post.common import add_train_flags

    p.add_argument("--init", required=True, metavar="CKPT", help="the checkpoint directory to start from")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="SHARDS", help="token shards from `gpt2kit data prepare` (same tokenizer)")
    src.add_argument("--jsonl", metavar="FILE", help="prompt/completion records, one JSON object per line")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that is not empty")
    p.add_argument("--chat", action="store_true",
                   help='JSONL: chat records {"messages": [...]} or Alpaca instruction/input/output; loss on the '
                        "assistant turns, the chat template saved in the checkpoint (see docs/align.md)")
    p.add_argument("--chat-tokens", action="store_true",
                   help="with --chat: add <|im_start|> and <|im_end|> as special tokens (embedding grown, head tied)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="JSONL: share of records held out (default 0.1)")
    p.add_argument("--n-ctx", type=int, default=None, metavar="N",
                   help="--data: context extension, grow the learned position table to N positions (new rows "
                        "copied from the existing ones) and fine-tune at that length")
    p.add_argument("--eval-text", metavar="FILE", help="report perplexity on this text before and after")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its latest checkpoint (Ctrl-C / SIGTERM and "
                        "--save-every save one; --jsonl too)")
    lo = p.add_argument_group("LoRA (adapters only, saved in peft's format; see docs/post.md)")
    lo.add_argument("--lora-r", type=int, metavar="R", help="train rank-R LoRA adapters on a frozen base")
    lo.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA scale numerator: update * A / R (default 2R)")
    lo.add_argument("--lora-targets", default="c_attn", metavar="LIST",
                    help="projections to adapt, from c_attn,c_proj,c_fc (default c_attn)")
    lo.add_argument("--lora-dropout", type=float, default=0.0, metavar="P", help="dropout on the adapters' input")
    lo.add_argument("--lora-merge", action="store_true", help="also write OUT/merged, base + adapter as a plain checkpoint")
    add_train_flags(p, DEFAULTS)


def run(args: argparse.Namespace) -> int:
    from ..hub import resolve_checkpoint
    from ..post.common import print_report, read_eval_text, train_overrides
    from ..post.finetune import finetune_jsonl, finetune_shards

    args.init = str(resolve_checkpoint(args.init, "--init"))  # a hub id works too
    overrides = train_overrides(args)
    lora = _lora_settings(args)
    text = read_eval_text(args.eval_text)
    if args.data:
        if args.chat or args.chat_tokens:
            from ..errors import UserError

            raise UserError("--chat applies to --jsonl records, not to token shards")
        if args.val_fraction != 0.1:
            from ..errors import UserError

            raise UserError("--val-fraction applies to --jsonl; shards carry their own val split")
        result = finetune_shards(args.init, args.data, args.out, overrides, eval_text=text, overwrite=args.overwrite,
                                 lora=lora, lora_merge=args.lora_merge, resume=args.resume, n_ctx=args.n_ctx)
    else:
        if args.n_ctx is not None:
            from ..errors import UserError

            raise UserError("--n-ctx (context extension) applies to --data token shards, not to --jsonl")
        from ..align.parallel import job

        with job() as env:  # under torchrun: data parallel, rank 0 writes and reports
            result = finetune_jsonl(args.init, args.jsonl, args.out, overrides, val_fraction=args.val_fraction,
                                    eval_text=text, overwrite=args.overwrite, chat=args.chat,
                                    chat_tokens=args.chat_tokens, lora=lora, lora_merge=args.lora_merge,
                                    resume=args.resume)
        if not env.is_main:
            return 0
    print_report(result.report(), args.json)
    return 0


def _lora_settings(args: argparse.Namespace):
    """LoraSettings from --lora-*, or None without --lora-r (the other --lora-* flags then refused)."""
    from ..errors import UserError

    if args.lora_r is None:
        if args.lora_alpha is not None or args.lora_merge or args.lora_dropout or args.lora_targets != "c_attn":
            raise UserError("--lora-alpha/--lora-targets/--lora-dropout/--lora-merge go with --lora-r R")
        return None
    from ..post.lora import LoraSettings, parse_targets

    settings = LoraSettings(r=args.lora_r, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r,
                            dropout=args.lora_dropout, targets=parse_targets(args.lora_targets))
    settings.check()
    return settings
