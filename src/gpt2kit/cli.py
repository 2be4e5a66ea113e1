"""`gpt2kit <command>`: parses arguments, calls the library, prints. Nothing else lives here.

Each command is a module in `gpt2kit.commands` with `add_arguments(parser)` and `run(args) -> int | None`.
Command modules import torch and friends inside `run`, so `gpt2kit --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import UserError

# (name, module under gpt2kit.commands, one-line help) in the order a user meets them.
COMMANDS: list[tuple[str, str, str]] = [
    ("tokenizer", "tokenizer", "train, inspect and apply byte-level BPE tokenizers"),
    ("data", "data", "turn corpora into token shards; check contamination"),
    ("train", "train", "train a GPT-2 (no arguments: the built-in demo job)"),
    ("plot", "plot", "plot loss and learning-rate curves of runs"),
    ("generate", "generate", "generate text from a checkpoint"),
    ("eval", "eval", "perplexity, bits per character and zero/few-shot tasks"),
    ("finetune", "finetune", "fine-tune a checkpoint on new data"),
    ("distill", "distill", "distil a teacher checkpoint into a smaller student"),
    ("quantize", "quantize", "quantise a checkpoint to int8/int4"),
    ("prune", "prune", "magnitude-prune a checkpoint"),
    ("lora", "lora", "LoRA adapters in peft's format: merge one into its base"),
    ("reward", "reward", "train a reward model on preference pairs, or score with one"),
    ("dpo", "dpo", "align a checkpoint to preference pairs with DPO"),
    ("rlhf", "rlhf", "RLHF (RLOO) of a checkpoint against a reward model or function"),
    ("export", "export", "export a checkpoint to GGUF (llama.cpp) or ONNX (onnxruntime)"),
    ("serve", "serve", "serve a checkpoint over an OpenAI-compatible HTTP API (continuous batching)"),
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line with exit code 2 (its default code), prefixed by prog."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt2kit",
        description="GPT-2 from raw text to a trained, evaluated, compressed model.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2kit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, module, help_text in COMMANDS:
        try:
            mod = importlib.import_module(f"gpt2kit.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"gpt2kit.commands.{module}":
                raise
            continue  # command not built yet
        # raw description: command docstrings carry usage examples whose line breaks matter
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def report_error(line: str) -> None:
    """One line on stderr. Under torchrun every rank exits 2 on the same bad input: rank 0 prints the
    line, and each rank also writes it to torchrun's error file (TORCHELASTIC_ERROR_FILE), where
    torchrun's failure summary shows it per rank, so an error only one rank sees is not lost either.
    torchrun itself then exits 1 (its ChildFailedError for any failed worker), listing `exitcode: 2`."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            # torchrun's own layout (error_handler.record_exception); its summary prints py_callstack
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}
            Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))
    if not error_file or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `gpt2kit train` with no arguments is the main job; other bare commands print their help.
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        code = args._run(args)
    except UserError as e:
        report_error(f"gpt2kit {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        print(f"gpt2kit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
