"""GPT-2 124M on the CPU: training step and prefill, gpt2kit vs nanoGPT's model vs transformers (sdpa).

    python benchmarks/model.py                 # full run (several minutes on 2 cores)
    python benchmarks/model.py --rounds 1 --steps 1 --cases prefill   # quick look

Every (implementation, case) runs in its own subprocess, so peak RSS is that implementation's alone;
rounds interleave the implementations so background load hits them alike. Prints one JSON object:
medians per implementation and case, and ratios vs the faster peer measured in the same run.

nanoGPT is loaded from a checkout: `git clone https://github.com/karpathy/nanoGPT`, then
`--nanogpt-dir DIR` (or NANOGPT_DIR=DIR); without one, its rows are skipped and the JSON says why.

Cases (float32, dropout 0, 2 threads unless --threads):
  train-4x256, train-1x1024: one forward + backward + AdamW step (tokens/s, peak RSS)
  prefill-1024: forward of 1024 tokens without grad, logits for the last position only (seconds)

gpt2kit's training steps run as its trainer runs them: fused AdamW and gpt2kit.runtime's glibc malloc
settings (big freed blocks kept for reuse instead of unmapped and page-faulted in again every step);
prefill runs with glibc's defaults, as gpt2kit's inference commands do. The controls
nanogpt-fused (fused AdamW) and nanogpt-tuned (fused AdamW + the same malloc settings) show how much of
the difference is the model itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import NANOGPT_ENV, load_nanogpt, nanogpt_dir  # noqa: E402

CASES = {"train-4x256": (4, 256), "train-1x1024": (1, 1024), "prefill-1024": (1, 1024)}
IMPLS = ["gpt2kit", "nanogpt", "nanogpt-fused", "nanogpt-tuned", "transformers"]
PEERS = ("nanogpt", "transformers")  # as their authors ship them; nanogpt-fused/-tuned are controls (see --help)


# ------------------------------------------------------------------------------------------------------
# One measurement, in this (fresh) process
# ------------------------------------------------------------------------------------------------------

def param_groups(model, weight_decay=0.1):
    """nanoGPT's grouping (decay 2-D weights only), shared by every implementation for a fair step."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build(impl: str, optimizer: str):
    """(forward_loss(idx, targets), forward_last(idx), model, optimizer) for one implementation."""
    import torch

    torch.manual_seed(0)
    if impl == "gpt2kit":
        from gpt2kit import GPT2, GPT2Config

        model = GPT2(GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0))
        loss_fn = lambda idx, tgt: model(idx, targets=tgt).loss  # noqa: E731
        last_fn = lambda idx: model(idx, last_only=True).logits  # noqa: E731
    elif impl == "nanogpt":
        GPT, GPTConfig = load_nanogpt(os.environ[NANOGPT_ENV])  # the driver checked it holds model.py
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, bias=True, dropout=0.0))
        loss_fn = lambda idx, tgt: model(idx, tgt)[1]  # noqa: E731
        last_fn = lambda idx: model(idx)[0]  # noqa: E731
    elif impl == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(cfg)
        assert model.config._attn_implementation == "sdpa"
        loss_fn = lambda idx, tgt: model(idx, labels=tgt).loss  # noqa: E731
        last_fn = lambda idx: model(idx, logits_to_keep=1, use_cache=False).logits  # noqa: E731
    else:
        raise SystemExit(f"unknown implementation {impl!r}")
    if impl == "nanogpt" and optimizer == "default":
        opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    else:
        fused = {"fused": True} if optimizer == "fused" else {}
        opt = torch.optim.AdamW(param_groups(model), lr=6e-4, betas=(0.9, 0.95), **fused)
    return loss_fn, last_fn, model, opt


def worker(impl: str, case: str, steps: int, threads: int, optimizer: str, malloc: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    if malloc:  # what gpt2kit's trainer does in its process (gpt2kit.runtime)
        from gpt2kit.runtime import retain_freed_memory

        assert retain_freed_memory(), "malloc tuning did not apply on this system"
    B, T = CASES[case]
    loss_fn, last_fn, model, opt = build(impl, optimizer)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50257, (B, T), generator=g)
    times, cpu_times = [], []
    if case.startswith("train"):
        model.train()
        # transformers shifts labels inside; give the others the same next-token targets
        targets = idx if impl == "transformers" else torch.cat([idx[:, 1:], idx[:, :1]], dim=1)
        for step in range(steps + 1):  # the first step warms up (allocations, optimizer state)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = loss_fn(idx, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        result = {"tokens_per_s": B * T / statistics.median(times), "loss": float(loss)}
    else:
        model.eval()
        with torch.no_grad():
            for step in range(steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                logits = last_fn(idx)
                if step:
                    times.append(time.perf_counter() - t0)
                    cpu_times.append(time.process_time() - c0)
        assert logits.shape[-1] == 50257 and logits.shape[1] == 1
        result = {"seconds": statistics.median(times)}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return result | {"impl": impl, "case": case, "times": times, "cpu_times": cpu_times,
                     "peak_rss_gib": peak_rss / 2**30, "malloc_tuning": malloc}


# ------------------------------------------------------------------------------------------------------
# Driver: interleaved rounds of subprocesses
# ------------------------------------------------------------------------------------------------------

def run_one(impl, case, args, optimizer, malloc) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, case, "--steps", str(args.steps),
           "--threads", str(args.threads), "--optimizer", optimizer] + (["--malloc-tuning"] if malloc else [])
    env = {**os.environ, **({NANOGPT_ENV: str(args.nanogpt_dir)} if args.nanogpt_dir else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{impl} {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + ["gpt2kit-plain-adamw"],
                    help="gpt2kit steps with fused AdamW and the glibc malloc settings of gpt2kit.runtime "
                         "(as gpt2kit's trainer does); nanogpt with its own configure_optimizers (on CPU: "
                         "torch's default AdamW); controls that separate model gains from the rest: "
                         "nanogpt-fused = nanoGPT's model with fused AdamW, nanogpt-tuned = that plus "
                         "gpt2kit's malloc settings, gpt2kit-plain-adamw = gpt2kit with torch's default "
                         "AdamW (and malloc settings)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one subprocess per impl each)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per subprocess (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nanogpt-dir", help="a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT); "
                                          "default: $NANOGPT_DIR; without one the nanogpt rows are skipped")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--malloc-tuning", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.threads, args.optimizer, args.malloc_tuning)))
        return

    skipped: dict[str, str] = {}
    args.nanogpt_dir, why = nanogpt_dir(args.nanogpt_dir)
    if why:
        skipped = {i: why for i in args.impls if i.startswith("nanogpt")}
        args.impls = [i for i in args.impls if i not in skipped]
        print(f"skipping {', '.join(skipped)}: {why}", file=sys.stderr)
    runs: dict[tuple[str, str], list[dict]] = {}
    for case in args.cases:
        impls = [i for i in args.impls
                 if not (case.startswith("prefill") and i in ("nanogpt-fused", "nanogpt-tuned", "gpt2kit-plain-adamw"))]
        for r in range(args.rounds):
            order = impls[r % len(impls):] + impls[: r % len(impls)]  # rotate who goes first
            for impl in order:
                base, optimizer = impl, "default"
                if impl in ("gpt2kit", "nanogpt-fused", "nanogpt-tuned"):
                    base, optimizer = impl.removesuffix("-fused").removesuffix("-tuned"), "fused"
                elif impl == "gpt2kit-plain-adamw":
                    base = "gpt2kit"
                # gpt2kit's trainer sets glibc's malloc for training; inference leaves it alone
                malloc = case.startswith("train") and (base == "gpt2kit" or impl == "nanogpt-tuned")
                res = run_one(base, case, args, optimizer, malloc)
                runs.setdefault((impl, case), []).append(res)
                print(f"{case:13s} {impl:16s} " + (f"{res['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in res
                      else f"{res['seconds']:.3f} s") + f"  peak RSS {res['peak_rss_gib']:.2f} GiB", file=sys.stderr)

    summary: dict[str, dict] = {}
    for (impl, case), rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        cpu = [t for r in rs for t in r["cpu_times"]]
        entry = {"median_step_s": statistics.median(times), "all_step_s": [round(t, 3) for t in times],
                 "median_cpu_s": statistics.median(cpu), "all_cpu_s": [round(t, 3) for t in cpu],
                 "peak_rss_gib": round(max(r["peak_rss_gib"] for r in rs), 3)}
        if case.startswith("train"):
            B, T = CASES[case]
            entry["tokens_per_s"] = round(B * T / entry["median_step_s"], 1)
            # process CPU time / threads: what the step costs with the cores to itself (shared machine)
            entry["tokens_per_s_cpu_time"] = round(B * T * args.threads / entry["median_cpu_s"], 1)
        summary.setdefault(case, {})[impl] = entry
    for entries in summary.values():
        peers = {k: v for k, v in entries.items() if k in PEERS}
        if not peers or "gpt2kit" not in entries:
            continue
        ours = entries["gpt2kit"]
        ratios = {}
        for clock in ("median_step_s", "median_cpu_s"):
            fastest = min(peers, key=lambda k: peers[k][clock])  # noqa: B023
            ratios[clock] = {
                "faster_peer": fastest,
                "speed_vs_faster_peer": round(peers[fastest][clock] / ours[clock], 3),
                **{f"speed_vs_{k}": round(v[clock] / ours[clock], 3) for k, v in entries.items() if k != "gpt2kit"},
            }
        ratios["peak_rss_vs_nanogpt"] = (round(ours["peak_rss_gib"] / entries["nanogpt"]["peak_rss_gib"], 3)
                                         if "nanogpt" in entries else None)
        entries["ratios"] = ratios
    import torch

    print(json.dumps({
        "benchmark": "model",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "loadavg_at_end": os.getloadavg()},
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
        "rounds": args.rounds, "steps_per_process": args.steps,
        "nanogpt_dir": str(args.nanogpt_dir) if args.nanogpt_dir else None,
        "skipped": skipped,
        "results": summary,
    }, indent=2))


if __name__ == "__main__":
    main()
