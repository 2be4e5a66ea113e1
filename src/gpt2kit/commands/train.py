"""Train a GPT-2 on token shards, or, with no --data/--config/--resume, run the built-in main job.

  gpt2kit train                                   # the main job: tokenizer + small GPT-2 on the stdlib
  gpt2kit train --data SHARDS --out RUN [--n-layer 4 --n-head 4 --n-embd 128 --block-size 128 ...]
  gpt2kit train --config run.toml [--lr 3e-4 ...]  # a TOML file; flags override it
  gpt2kit train --out RUN --resume                # continue RUN exactly where it stopped
  torchrun --standalone --nproc_per_node=2 -m gpt2kit train ... --strategy ddp|fsdp|zero1

Every key of the four config sections (model, data, optim, run) is a flag: `--warmup-steps 100` sets
`[optim] warmup_steps`. The resolved config is written to RUN/config.toml.
"""

from __future__ import annotations

import argparse
import sys

from ..train.config import HELP, KEYS, field_type, flag_name, suggest_key

_OWN_FLAGS = {"config", "resume", "overwrite"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE.toml", help="TOML config ([model] [data] [optim] [run] or flat keys)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest sound checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds checkpoints")
    groups = {s: parser.add_argument_group(f"[{s}] settings") for s in ("model", "data", "optim", "run")}
    for key, (section, f) in KEYS.items():
        typ = field_type(f)
        default = f.default
        shown = default if default not in (None, "") else ("preset/data" if section == "model" else "none")
        help_text = f"{HELP.get(key, '')} (default: {shown})"
        if typ is bool:
            groups[section].add_argument(
                flag_name(key), dest=key, nargs="?", const="true", default=argparse.SUPPRESS,
                metavar="BOOL", help=help_text,
            )
        else:
            groups[section].add_argument(
                flag_name(key), dest=key, default=argparse.SUPPRESS, metavar=typ.__name__.upper(), help=help_text,
            )
    _suggest_on_unknown_flags(parser)


def _suggest_on_unknown_flags(parser: argparse.ArgumentParser) -> None:
    """Unknown flags fail here, with the nearest valid key, instead of as argparse's bare complaint."""
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, rest = original(args, namespace)
        for a in rest:
            if a.startswith("--"):
                parser.error(f"unknown option {a.split('=')[0]}{_flag_hint(a.split('=')[0])}")
        if rest:
            parser.error(f"unexpected argument {rest[0]!r} (options are --key value)")
        return ns, rest

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _flag_hint(flag: str) -> str:
    hint = suggest_key(flag)
    return hint.replace("(did you mean ", "(did you mean --").replace("_", "-") if hint else ""


def run(args: argparse.Namespace) -> int:
    from ..train.config import coerce

    cli = {k: coerce(k, getattr(args, k), flag_name(k)) for k in KEYS if hasattr(args, k)}
    if not cli.get("data") and not args.config and not args.resume:
        from ..train.main_job import run_main_job

        return run_main_job(cli, overwrite=args.overwrite)

    from ..train.trainer import resolve_config, train

    cfg = resolve_config(cli, args.config, resume=args.resume)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not result.is_main:  # under torchrun only rank 0 reports (its loss is its own shard's)
        return 0
    v = result.val
    summary = f"step {result.step}: train loss {result.train_loss:.4f}" if result.train_loss is not None else (
        f"step {result.step}"
    )
    if v:
        summary += f", val loss {v['val_loss']:.4f}, ppl {v['val_ppl']:.2f}, bpc {v['val_bpc']:.4f}"
    if result.skipped_steps:
        summary += f", {result.skipped_steps} skipped step(s)"
    print(summary)
    print(f"checkpoint: {result.last_checkpoint}" + (f"  best: {result.best_dir}" if result.best_dir else ""))
    sys.stdout.flush()
    return 0
