"""LoRA adapters (peft's format: adapter_config.json + adapter_model.safetensors).

  gpt2kit lora merge ADAPTER --base CKPT --out MERGED     # W + B @ A * alpha / r, a plain checkpoint

ADAPTER is written by `gpt2kit finetune --lora-r R ...` or by peft (`PeftModel.save_pretrained`); --base
defaults to the adapter's base_model_name_or_path. See docs/post.md.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", metavar="<action>", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base: a plain checkpoint directory")
    m.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--base", metavar="CKPT", help="the base checkpoint (default: the adapter's base_model_name_or_path)")
    m.add_argument("--out", required=True, metavar="DIR", help="the merged checkpoint directory to write")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..post.common import print_report
    from ..post.lora import merge_checkpoint

    print_report(merge_checkpoint(args.adapter, args.out, base=args.base, overwrite=args.overwrite), args.json)
    return 0
