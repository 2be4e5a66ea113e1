"""Turn corpora into token shards (`prepare`), look inside them (`inspect`), and check evaluation text
for overlap with the training data (`contamination`). See docs/data.md."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="<subcommand>", parser_class=type(parser))
    sub.required = True

    p = sub.add_parser(
        "prepare",
        help="tokenize corpora into train.bin/val.bin + meta.json",
        description="Read, normalize, de-duplicate and tokenize documents into flat token shards. "
        "Without --input, the built-in corpus (this Python's standard library) is used.",
    )
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="files, folders (recursive), globs, or - for stdin; one file = one document unless "
                   "--split-on or JSONL/Parquet (default: the Python standard library corpus)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (encoder.json+vocab.bpe or vocab.json+merges.txt)")
    p.add_argument("--out", required=True, metavar="DIR", help="output shard directory (must not exist unless --overwrite)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F", help="share of documents for val.bin (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and the MinHash (default 0)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (default 2)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                   help="input format (auto: by extension; .jsonl/.ndjson, .parquet, else text)")
    p.add_argument("--split-on", metavar="SEP", help=r"text inputs: documents are separated by SEP, e.g. '\n\n'")
    p.add_argument("--field", default="text", help="JSONL/Parquet field holding the text (default: text)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"], help="invalid UTF-8: fail or use U+FFFD")
    p.add_argument("--on-bad-line", default="fail", choices=["fail", "skip"], help="invalid JSONL/Parquet record: fail or skip")
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="remove exact and near-duplicate documents (default on)")
    p.add_argument("--near-dup", action=argparse.BooleanOptionalAction, default=True,
                   help="with --dedup, also remove near duplicates (MinHash LSH; default on)")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, metavar="J",
                   help="Jaccard similarity of token 4-gram sets at which a document is a near duplicate (default 0.8)")
    p.add_argument("--train-tokenizer", action="store_true", help="first train a BPE tokenizer on the inputs (saved in OUT/tokenizer)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size for --train-tokenizer")
    p.add_argument("--normalization", default=None, choices=["none", "NFC", "NFKC"], help="--train-tokenizer: Unicode normalization")
    p.add_argument("--lowercase", action="store_true", help="--train-tokenizer: lower-case the text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(_data_run=_run_prepare)

    p = sub.add_parser("inspect", help="show a shard directory's meta.json summary and check it",
                       description="Print a shard directory's counts, verify its files, and optionally that "
                       "it matches a tokenizer.")
    p.add_argument("data_dir", metavar="DIR")
    p.add_argument("--tokenizer", metavar="DIR", help="fail (exit 2) unless the shards were made with this tokenizer")
    p.add_argument("--show", type=int, default=0, metavar="K", help="decode and print the first K documents of train")
    p.add_argument("--json", action="store_true", help="print meta.json as JSON")
    p.set_defaults(_data_run=_run_inspect)

    p = sub.add_parser("contamination", help="n-gram overlap between training shards and evaluation text",
                       description="GPT-3 style contamination check: the share of evaluation documents that "
                       "share an n-gram of normalized words with the training split.")
    p.add_argument("--train", required=True, metavar="DIR", help="shard directory (its train split is read)")
    p.add_argument("--eval", required=True, nargs="+", metavar="FILE", help="evaluation text (files, folders, globs)")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words (default 13, as GPT-3)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to decode the shards (default: the one in meta.json)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"])
    p.add_argument("--split-on", metavar="SEP", help=r"evaluation documents are separated by SEP, e.g. '\n'")
    p.add_argument("--field", default="text")
    p.add_argument("--top", type=int, default=10, help="how many worst offenders to list")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(_data_run=_run_contamination)


def run(args: argparse.Namespace) -> int:
    return args._data_run(args)


def _read_options(args):
    from ..data.readers import ReadOptions, unescape_separator

    return ReadOptions(
        format=args.format,
        split_on=unescape_separator(args.split_on) if args.split_on is not None else None,
        field=args.field,
        errors=getattr(args, "errors", "strict"),
        on_bad_line=getattr(args, "on_bad_line", "fail"),
    )


def _run_prepare(args) -> int:
    from ..data.shards import prepare
    from ..errors import UserError

    if args.train_tokenizer:
        if not args.vocab_size:
            raise UserError("--train-tokenizer needs --vocab-size N")
        if args.tokenizer:
            raise UserError("pass either --tokenizer or --train-tokenizer, not both")
    elif args.vocab_size or args.normalization or args.lowercase:
        raise UserError("--vocab-size, --normalization and --lowercase only apply with --train-tokenizer")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    result = prepare(
        args.input,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        read=_read_options(args),
        dedup=args.dedup,
        near_dup=args.near_dup,
        near_dup_threshold=args.near_dup_threshold,
        overwrite=args.overwrite,
        progress=not args.quiet,
        train_tokenizer_vocab=args.vocab_size if args.train_tokenizer else None,
        train_tokenizer_kwargs={"normalization": args.normalization, "lowercase": args.lowercase,
                                "workers": args.workers} if args.train_tokenizer else None,
    )
    meta = result.meta
    for split in ("train", "val"):
        s = meta["splits"][split]
        print(f"{split}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['characters']:,} characters")
    d = meta["dedup"]
    print(f"dedup: removed {d['exact_removed']:,} exact and {d['near_removed']:,} near duplicates "
          f"(report: {result.out_dir / 'dedup.jsonl'})")
    print(f"wrote {result.out_dir} ({meta['dtype']}) in {result.seconds:.1f} s, {result.mb_per_s:.1f} MB/s")
    return 0


def _run_inspect(args) -> int:
    import json

    from ..data.meta import SPLITS, check_fingerprint, document_ends, open_tokens, read_meta

    meta = read_meta(args.data_dir)
    for split in SPLITS:  # size checks: a truncated or mismatched shard is an error here, not in training
        open_tokens(args.data_dir, split, meta)
        document_ends(args.data_dir, split, meta)
    tok = None
    if args.tokenizer:
        from ..tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(args.tokenizer)
        check_fingerprint(meta, tok)
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
    else:
        print(f"{args.data_dir}: {meta['dtype']}, vocab {meta['vocab_size']}, eos {meta['eos_id']}, "
              f"tokenizer {meta.get('tokenizer')} ({str(meta.get('tokenizer_fingerprint'))[:12]})")
        for split in SPLITS:
            s = meta["splits"][split]
            print(f"  {split}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
                  f"{s['characters']:,} characters, {s['bytes']:,} bytes")
        d = meta.get("dedup", {})
        print(f"  dedup: {d.get('exact_removed', 0)} exact, {d.get('near_removed', 0)} near removed")
        if tok is not None:
            print("  tokenizer fingerprint matches")
    if args.show:
        from ..data.shards import iter_split_documents

        for i, text in enumerate(iter_split_documents(args.data_dir, "train", tok)):
            if i >= args.show:
                break
            print(f"--- document {i} ({len(text)} characters)\n{text}")
    return 0


def _run_contamination(args) -> int:
    import json

    from ..data.contamination import contamination_report

    tok = None
    if args.tokenizer:
        from ..tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(args.tokenizer)
    args.errors, args.on_bad_line = "replace", "fail"
    report = contamination_report(args.train, args.eval, n=args.n, read=_read_options(args), tokenizer=tok, top=args.top)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"{report['contaminated']} of {report['checked']} evaluation documents "
          f"({100 * report['share_contaminated']:.1f}%) share a {report['n']}-gram with {report['train']} "
          f"({report['too_short']} too short to check)")
    for r in report["worst"]:
        print(f"  {r['share']:6.1%}  {r['matched']}/{r['ngrams']}  {r['source']}  \"{r['example']}\"")
    return 0
