"""Export a checkpoint for another runtime: GGUF for llama.cpp, ONNX (decoder with past key/values) for
onnxruntime.

  gpt2kit export CKPT --format gguf --out model.gguf [--dtype f32|f16|q8_0]
  gpt2kit export CKPT --format onnx --out model-onnx/

CKPT is a float gpt2kit checkpoint directory, a local Hugging Face GPT-2 directory or a hub id (gpt2,
owner/repo@rev). Variants (attention patterns, MoE, shared layers) and quantized checkpoints are refused:
the other runtimes' GPT-2 graphs cannot run them. See docs/interop.md.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="float checkpoint directory or hub id")
    p.add_argument("--format", required=True, choices=["gguf", "onnx"], help="gguf (llama.cpp) or onnx (onnxruntime)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .gguf file, or the ONNX output directory")
    p.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32",
                   help="GGUF weight type (default f32; q8_0 is llama.cpp's 8-bit blocks of 32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UserError
    from ..hub import resolve_checkpoint
    from ..model import GPT2
    from ..model.hf import is_quantized_checkpoint
    from ..post.common import print_report
    from ..tokenizer import Tokenizer

    ckpt = resolve_checkpoint(args.checkpoint)
    if is_quantized_checkpoint(ckpt):
        raise UserError(f"{args.checkpoint}: a quantized gpt2kit checkpoint cannot be exported; export the float "
                        "checkpoint it came from (for GGUF, --dtype q8_0 quantizes in llama.cpp's format)")
    out = Path(args.out)
    if args.format == "onnx" and args.dtype != "f32":
        raise UserError("--dtype applies to --format gguf; the ONNX export is float32")
    if args.format == "gguf" and out.exists() and not args.overwrite:
        raise UserError(f"output exists: {out} (choose another path or pass --overwrite)")
    model = GPT2.from_pretrained(ckpt, dtype=None).eval()
    tokenizer = Tokenizer.from_pretrained(ckpt)
    if args.format == "gguf":
        from ..export.gguf import export_gguf

        report = export_gguf(model, tokenizer, out, dtype=args.dtype)
    else:
        from ..export.onnx import export_onnx

        report = export_onnx(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print_report(report, args.json)
    return 0
