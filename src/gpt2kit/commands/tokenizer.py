"""Train, inspect and apply byte-level BPE tokenizers (GPT-2's exactly, or your own).

gpt2kit tokenizer train --input FILES... --vocab-size N --out DIR
gpt2kit tokenizer encode --tokenizer DIR [--input FILE]      ids to stdout, space-separated
gpt2kit tokenizer decode --tokenizer DIR [--input FILE]      ids in, text to stdout
gpt2kit tokenizer info DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the usage lines of the docstring
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True, parser_class=type(parser))

    p = sub.add_parser("train", help="learn a byte-level BPE from text files")
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="UTF-8 text files")
    p.add_argument("--vocab-size", type=int, required=True, help="total ids: 256 bytes + merges + specials")
    p.add_argument("--out", type=Path, required=True, help="output directory (vocab.json, merges.txt, ...)")
    p.add_argument(
        "--min-frequency", type=int, default=2, help="stop when the best pair is rarer (default 2)"
    )
    p.add_argument(
        "--normalization", default="none", choices=["none", "NFC", "NFKC"], help="Unicode normalization"
    )
    p.add_argument("--lowercase", action="store_true", help="lower-case text before tokenizing (saved)")
    p.add_argument(
        "--special-tokens",
        nargs="*",
        default=["<|endoftext|>"],
        metavar="TOKEN",
        help="special tokens, given ids after the merges (default: <|endoftext|>)",
    )
    p.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="invalid UTF-8 in inputs: strict = stop and report file and byte offset, replace = U+FFFD",
    )
    p.add_argument("--workers", type=int, default=None, help="pre-tokenization processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(action_fn=_train)

    p = sub.add_parser("encode", help="text to ids (space-separated on stdout)")
    p.add_argument("--tokenizer", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--input", type=Path, default=None, metavar="FILE", help="UTF-8 text file (default: stdin)"
    )
    p.add_argument(
        "--allowed-special",
        nargs="*",
        default=None,
        metavar="TOKEN",
        help="special tokens to encode as their ids ('all' for every one); others in the text are an error",
    )
    p.add_argument("--ordinary", action="store_true", help="encode special-token text as ordinary text")
    p.add_argument("--engine", choices=["tiktoken", "python"], default="tiktoken")
    p.set_defaults(action_fn=_encode)

    p = sub.add_parser("decode", help="ids (whitespace-separated) to text")
    p.add_argument("--tokenizer", type=Path, required=True, metavar="DIR")
    p.add_argument("--input", type=Path, default=None, metavar="FILE", help="file of ids (default: stdin)")
    p.set_defaults(action_fn=_decode)

    p = sub.add_parser("info", help="describe a tokenizer directory")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(action_fn=_info)


def run(args: argparse.Namespace) -> int | None:
    return args.action_fn(args)


def _read_input_text(path: Path | None) -> str:
    from gpt2kit.errors import UserError
    from gpt2kit.tokenizer.train import read_text_file

    if path is not None:
        return read_text_file(path)
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin: not valid UTF-8 at byte offset {e.start}") from None


def _train(args) -> int:
    from gpt2kit.errors import UserError
    from gpt2kit.fileio import atomic_dir
    from gpt2kit.tokenizer import Tokenizer

    for f in args.input:  # fail before any work, and before touching --out
        if not f.exists():
            raise UserError(f"--input file not found: {f}")
        if not f.is_file():
            raise UserError(f"--input is not a file: {f}")
    if args.out.exists() and not args.overwrite and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(
            f"--out exists and is not empty: {args.out} (choose another path or pass --overwrite)"
        )
    t0 = time.perf_counter()
    tok = Tokenizer.train(
        list(args.input),
        args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=args.special_tokens,
        normalization=args.normalization,
        lowercase=args.lowercase,
        progress=not args.no_progress,
        workers=args.workers,
        errors=args.errors,
    )
    seconds = time.perf_counter() - t0
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        tok.save(tmp)
    note = ""
    if len(tok.merges) < args.vocab_size - 256 - len(tok.special_tokens):
        note = f" (stopped early: no pair occurs >= {args.min_frequency} times)"
    print(
        f"trained {len(tok.merges)} merges, vocab size {tok.vocab_size}{note} in {seconds:.1f} s -> {args.out} "
        f"(fingerprint {tok.fingerprint[:12]})"
    )
    return 0


def _encode(args) -> int:
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer, engine=args.engine)
    text = _read_input_text(args.input)
    if args.ordinary:
        ids = tok.encode_ordinary(text)
    else:
        allowed = args.allowed_special or ()
        if "all" in allowed:
            allowed = "all"
        ids = tok.encode(text, allowed_special=allowed if allowed == "all" else set(allowed))
    sys.stdout.write(" ".join(map(str, ids)) + "\n")
    return 0


def _decode(args) -> int:
    from gpt2kit.errors import UserError
    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.tokenizer)
    where = args.input or "stdin"
    ids = []
    for n, field in enumerate(_read_input_text(args.input).split(), 1):
        try:
            ids.append(int(field))
        except ValueError:
            raise UserError(f"{where}: item {n} is {field[:20]!r}, expected an integer token id") from None
    sys.stdout.write(tok.decode(ids))
    return 0


def _info(args) -> int:
    import json

    from gpt2kit.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(args.dir)
    longest = sorted(tok.ranks, key=len, reverse=True)[:5]
    info = {
        "directory": str(args.dir),
        "files": sorted(p.name for p in args.dir.iterdir() if p.suffix in (".json", ".txt", ".bpe")),
        "vocab_size": tok.vocab_size,
        "merges": len(tok.merges),
        "special_tokens": tok.special_tokens,
        "normalization": tok.normalization,
        "lowercase": tok.lowercase,
        "fingerprint": tok.fingerprint,
        "longest_tokens": [t.decode("utf-8", "replace") for t in longest],
    }
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        for k, v in info.items():
            print(f"{k:15s} {v}")
    return 0
