"""Plot the loss, learning-rate and validation bits-per-character curves of runs into one PNG.

  gpt2kit plot runs/a                      # writes runs/a/curves.png
  gpt2kit plot runs/a runs/b --out cmp.png # compare runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--out", metavar="PNG", help="output image (default: RUN/curves.png of the first run)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N", help="moving average over N logged points")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from ..train.plot import plot_runs

    if args.out:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise UserError(f"--out {out} exists (pass --overwrite to replace it)")
        if out.suffix.lower() != ".png":
            raise UserError(f"--out {out}: expected a .png file name")
    else:
        out = Path(args.runs[0]) / "curves.png"  # our own file inside the run: refreshed freely
    if args.smooth < 1:
        raise UserError(f"--smooth must be >= 1, got {args.smooth}")
    plot_runs(args.runs, out, smooth=args.smooth)
    print(out)
    return 0
