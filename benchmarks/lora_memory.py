"""Peak RSS of a LoRA fine-tune vs a full fine-tune of the `gpt2` preset (124M), same batch, fresh processes.

  flock /tmp/gpt2kit-bench.lock python benchmarks/lora_memory.py [--work DIR] [--steps 3] [--batch 2] [--block 128]

The base is the `gpt2` preset with random weights (memory does not depend on the values) and the GPT-2
tokenizer; the data is tinyshakespeare (../shared/data). Each run is `gpt2kit finetune` under
/usr/bin/time -v ("Maximum resident set size"). Prints JSON: both peaks, their ratio, val loss before/after.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _setup(work: Path) -> tuple[Path, Path]:
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    base, shards = work / "base", work / "shards"
    if not (base / "model.safetensors").is_file():
        GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(base, tokenizer=Tokenizer.from_pretrained(DATA / "gpt2"))
    if not (shards / "meta.json").is_file() or not json.loads((shards / "meta.json").read_text())["splits"]["val"]["tokens"]:
        subprocess.run([sys.executable, "-m", "gpt2kit", "data", "prepare", "--input", str(DATA / "tinyshakespeare.txt"),
                        "--tokenizer", str(base), "--out", str(shards), "--split-on", "\n\n", "--val-fraction", "0.1",
                        "--quiet",
                        "--overwrite"], check=True)
    return base, shards


def _run(base: Path, shards: Path, out: Path, steps: int, batch: int, block: int, lora: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "gpt2kit", "finetune", "--init", str(base), "--data",
           str(shards), "--out", str(out), "--overwrite", "--max-steps", str(steps), "--batch-size", str(batch),
           "--block-size", str(block), "--eval-batches", "2", "--warmup-steps", "0", "--lr", "1e-3",
           "--no-progress", "--device", "cpu", "--json", *lora]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    report = json.loads(p.stdout[p.stdout.index("{"):])
    return {"peak_rss_mib": round(rss_kb / 1024, 1), "val_loss_before": report.get("val_loss_before"),
            "val_loss_after": report.get("val_loss_after"), "wall_s": report.get("wall_s"), "command": " ".join(cmd[2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/gpt2kit-lora-bench")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=128)
    a = ap.parse_args()
    if not (DATA / "tinyshakespeare.txt").is_file():
        raise SystemExit(f"skipped: {DATA} not available")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base, shards = _setup(work)
    full = _run(base, shards, work / "full", a.steps, a.batch, a.block, [])
    lora = _run(base, shards, work / "lora", a.steps, a.batch, a.block,
                ["--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "c_attn,c_proj,c_fc"])
    print(json.dumps({"preset": "gpt2", "steps": a.steps, "batch": a.batch, "block": a.block, "full": full,
                      "lora": lora, "rss_ratio": round(lora["peak_rss_mib"] / full["peak_rss_mib"], 3)}, indent=2))


if __name__ == "__main__":
    main()
