"""Evaluate a checkpoint: perplexity / bits per character of a text file, or a zero/few-shot task.

  gpt2kit eval CKPT --text valid.txt [--stride 512] [--mode sliding|document] [--detokenize wikitext]
  gpt2kit eval CKPT --task lambada --file lambada_test.jsonl
  gpt2kit eval CKPT --task winograd|choice|classify|summarize --file F [task options]

CKPT is a gpt2kit checkpoint directory or a local Hugging Face GPT-2 directory. Results print as a
Markdown table (or JSON with --json); --out FILE also writes FILE (JSON) and a .md table beside it.
File formats: docs/eval.md.
"""

from __future__ import annotations

import argparse
import sys

TASK_NAMES = ["lambada", "winograd", "choice", "classify", "summarize"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="DIR", help="checkpoint directory (gpt2kit or Hugging Face GPT-2) or a hub id (gpt2, owner/repo@rev)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", metavar="FILE", help="plain UTF-8 text file to measure perplexity on")
    what.add_argument("--task", choices=TASK_NAMES, help="a task; its examples come from --file")
    p.add_argument("--file", metavar="F", help="the task's examples (JSONL; Winograd also takes the WSC XML)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint's own)")

    g = p.add_argument_group("text (perplexity)")
    g.add_argument("--mode", choices=["sliding", "document"], default="sliding",
                   help="sliding: Hugging Face's strided windows over the whole file (default); document: "
                        "each document after an EOS token in disjoint windows (lm-evaluation-harness)")
    g.add_argument("--stride", type=int, default=None, help="sliding-window stride in tokens (default n_ctx/2)")
    g.add_argument("--detokenize", choices=["wikitext", "ptb"], default=None,
                   help="undo WikiText/PTB tokenization before the model reads the text")
    g.add_argument("--doc-split", choices=["auto", "eos", "wikitext", "blank", "none"], default="auto",
                   help="how --mode document finds documents (default auto: <|endoftext|> markers, else "
                        "WikiText top-level headings, else the whole file)")

    g = p.add_argument_group("classify")
    g.add_argument("--labels", help="label=word pairs, e.g. 'positive=great,negative=terrible'")
    g.add_argument("--template", default=None, help="prompt with {text}, default '{text}\\nAnswer:'")
    g.add_argument("--shots", type=int, default=0, help="labelled examples before each one (default 0)")
    g.add_argument("--shots-file", metavar="F", help="where shots come from (default: the --file itself)")

    g = p.add_argument_group("summarize")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--sentences", type=int, default=3, help="keep this many generated sentences (default 3)")

    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per forward pass (default: 4096 tokens' worth for text, 32 for tasks)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and activations (default float32; log-softmax is always float32)")
    g.add_argument("--limit", type=int, default=None,
                   help="only the first N examples (tasks) or the first N lines (text)")
    g.add_argument("--seed", type=int, default=1234, help="k-shot draws and summary sampling")
    g.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    g.add_argument("--out", metavar="FILE", help="also write the results: FILE as JSON, FILE.md as a table")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def read_text(path: str, limit: int | None) -> str:
    from ..errors import UserError, require_file

    p = require_file(path, "--text file")
    try:
        with open(p, encoding="utf-8", newline="") as f:
            if limit is None:
                text = f.read()
            else:
                text = "".join(line for _, line in zip(range(limit), f))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{p}: the file is empty (nothing to evaluate)")
    return text


def load(args):
    """(model, tokenizer) from the checkpoint, refusing a tokenizer that does not fit the model."""
    import torch

    from ..errors import UserError
    from ..model import GPT2, check_tokenizer_fits
    from ..tokenizer import Tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: unknown device {device!r}") from None
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.checkpoint)
    model = GPT2.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    check_tokenizer_fits(model.config, tokenizer)
    model.eval()
    return model, tokenizer


def run(args) -> int:
    from ..errors import UserError

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.text and args.file:
        raise UserError("--file goes with --task; for perplexity of a text file use --text alone")
    if args.task and not args.file:
        raise UserError(f"--task {args.task} needs --file with its examples")
    if args.task == "classify" and not args.labels:
        raise UserError("--task classify needs --labels, e.g. --labels 'positive=great,negative=terrible'")
    if args.text:
        text = read_text(args.text, args.limit)  # before loading the model: bad input fails fast

    from ..eval.detokenize import get_detokenizer
    from ..eval.report import to_json, to_markdown, write_report

    model, tokenizer = load(args)
    progress = not args.no_progress
    n_ctx = model.config.n_ctx
    if args.text:
        from ..eval.perplexity import evaluate_text

        batch_size = args.batch_size or max(1, 4096 // n_ctx)
        result = evaluate_text(model, tokenizer, text, mode=args.mode, stride=args.stride,
                               detokenize=get_detokenizer(args.detokenize), doc_split=args.doc_split,
                               batch_size=batch_size, progress=progress)
        result = {"file": args.text, "checkpoint": args.checkpoint, "detokenize": args.detokenize, **result}
        title = f"Perplexity of {args.text}"
    else:
        from ..eval.tasks import TASKS

        batch_size = args.batch_size or 32
        kwargs = {"limit": args.limit, "progress": progress}
        if args.task == "classify":
            kwargs.update(labels=args.labels, shots=args.shots, shots_file=args.shots_file, seed=args.seed)
            if args.template is not None:
                kwargs["template"] = args.template.replace("\\n", "\n")
        if args.task == "summarize":
            kwargs.update(max_new_tokens=args.max_new_tokens, top_k=args.top_k, temperature=args.temperature,
                          sentences=args.sentences, seed=args.seed)
        else:
            kwargs["batch_size"] = batch_size
        result = TASKS[args.task](model, tokenizer, args.file, **kwargs)
        result = {"file": args.file, "checkpoint": args.checkpoint, **result}
        title = f"{args.task} on {args.file}"

    if args.out:
        write_report(result, args.out, title)
    if args.json:
        print(to_json(result))
    else:
        print(to_markdown(result, title), end="")
    sys.stdout.flush()
    return 0
