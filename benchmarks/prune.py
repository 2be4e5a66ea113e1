"""Pruning: perplexity against sparsity (0.1 ... 0.9), global and per-layer magnitude pruning.

  python benchmarks/prune.py --ckpt RUN/step-000400 --val-text val.txt --plot docs/post-prune.png

For each sparsity the float checkpoint is pruned in memory with gpt2kit.post.prune (the same code as
`gpt2kit prune`) and its sliding-window perplexity measured on the first --eval-tokens tokens of the
validation text. Prints JSON (and a Markdown table on stderr); --plot writes the PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--val-text", type=Path, required=True)
    ap.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--scopes", default="global,layer")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--plot", type=Path, help="write the perplexity-vs-sparsity plot here (PNG)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from gpt2kit.model import GPT2
    from gpt2kit.post.common import load_tokenizer, perplexity
    from gpt2kit.post.prune import apply_masks, magnitude_masks, sparsity_report

    tok = load_tokenizer(args.ckpt)
    text = args.val_text.read_text(encoding="utf-8")
    base = GPT2.from_pretrained(args.ckpt)
    dense = perplexity(base, tok, text, args.eval_tokens)["ppl"]
    rows = []
    for scope in args.scopes.split(","):
        for s in (float(x) for x in args.sparsities.split(",")):
            model = GPT2.from_pretrained(args.ckpt)
            masks = magnitude_masks(model, s, scope)
            apply_masks(model, masks)
            rep = sparsity_report(model, masks)
            ppl = perplexity(model, tok, text, args.eval_tokens)["ppl"]
            rows.append({"scope": scope, "sparsity": s, "real_sparsity": rep["sparsity_pruned_tensors"],
                         "sparsity_all_parameters": rep["sparsity_all_parameters"], "ppl": ppl,
                         "ppl_ratio": ppl / dense})
            print(f"{scope} {s:.1f}: ppl {ppl:.2f} ({ppl / dense:.3f}x)", file=sys.stderr, flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "checkpoint": str(args.ckpt), "params": sum(p.numel() for p in base.parameters()),
              "eval_tokens": args.eval_tokens, "dense_ppl": dense, "rows": rows}
    print("| scope | sparsity | real (pruned tensors) | all params | ppl | x dense |", file=sys.stderr)
    print("|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['scope']} | {r['sparsity']:.1f} | {r['real_sparsity']:.4f} | {r['sparsity_all_parameters']:.4f} | "
              f"{r['ppl']:.2f} | {r['ppl_ratio']:.3f} |", file=sys.stderr)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for scope in args.scopes.split(","):
            pts = [r for r in rows if r["scope"] == scope]
            ax.plot([0.0] + [r["sparsity"] for r in pts], [dense] + [r["ppl"] for r in pts], marker="o", label=scope)
        ax.axhline(dense, color="gray", linestyle=":", label="dense")
        ax.set_xlabel("sparsity of the projection matrices")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.set_title("magnitude pruning (no fine-tuning)")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        result["plot"] = str(args.plot)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
