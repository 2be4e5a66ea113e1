"""Attention variants: training step time per token and peak RSS against T, decode speed against context.

    flock /tmp/gpt2kit-bench.lock python benchmarks/attention.py [--lengths 512,1024,2048,4096,8192]

A 4-layer d=256 model (4 heads, vocabulary --vocab, default 8192 so the output head does not hide the
attention's cost; pass 50257 for GPT-2's). Each (variant, T) runs in a fresh subprocess so its peak RSS
is its own: one warm-up step, then the median of --steps timed steps (forward + backward, batch 1).
Decoding: prefill a prompt of 256 or 4096 tokens, then time --decode-tokens single-token steps on the
variant's cache (rolling window / state); the cache's bytes are reported. Prints one JSON object.
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

VARIANTS = {
    "dense": {},
    "sliding": {"attention": "sliding", "window": 256},
    "fixed": {"attention": "fixed", "attention_block": 128, "attention_summary": 8},
    "linear": {"attention": "linear"},
}


def _config(variant: str, n_ctx: int, vocab: int):
    from gpt2kit.model import GPT2Config

    return GPT2Config(vocab_size=vocab, n_ctx=n_ctx, n_layer=4, n_head=4, n_embd=256, dropout=0.0,
                      attn_dropout=0.0, eos_token_id=0, **VARIANTS[variant])


def _train_child(variant: str, T: int, steps: int, vocab: int) -> dict:
    import torch

    from gpt2kit.model.gpt2 import GPT2Network

    torch.manual_seed(0)
    model = GPT2Network(_config(variant, T, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, vocab, (1, T))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        model(idx, targets=idx).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"variant": variant, "T": T, "step_s": step, "us_per_token": 1e6 * step / T,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _decode_child(variant: str, context: int, tokens: int, vocab: int) -> dict:
    import torch

    from gpt2kit.model.gpt2 import GPT2Network
    from gpt2kit.model.kv_cache import KVCache

    torch.manual_seed(0)
    n_ctx = context + tokens + 8  # + the warm-up steps
    model = GPT2Network(_config(variant, n_ctx, vocab)).eval()
    cache = KVCache.allocate(model.config, 1, n_ctx)
    with torch.inference_mode():
        model(torch.randint(0, vocab, (1, context)), kv_cache=cache, last_only=True)
        tok = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(4):  # warm-up
            tok = model(tok, kv_cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(tokens):
            tok = model(tok, kv_cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        dt = time.perf_counter() - t0
    return {"variant": variant, "context": context, "tok_per_s": tokens / dt, "cache_bytes": cache.nbytes}


def _in_child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import torch

    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512": "avx512f" in flags, "avx2": "avx2" in flags, "bf16": "avx512_bf16" in flags,
            "threads": torch.get_num_threads(), "load_before": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--decode-contexts", default="256,4096")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, variant, n, m, vocab = a.child
        fn = _train_child if kind == "train" else _decode_child
        print(json.dumps(fn(variant, int(n), int(m), int(vocab))))
        return
    variants = a.variants.split(",")
    lengths = [int(x) for x in a.lengths.split(",")]
    report: dict = {"machine": _machine(), "model": "L4 H4 d256", "vocab": a.vocab, "variants": VARIANTS,
                    "train": [], "decode": []}
    for T in lengths:
        for v in variants:
            row = _in_child(["train", v, str(T), str(a.steps), str(a.vocab)])
            report["train"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    for ctx in (int(x) for x in a.decode_contexts.split(",")):
        for v in variants:
            row = _in_child(["decode", v, str(ctx), str(a.decode_tokens), str(a.vocab)])
            report["decode"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    per_token = {(r["variant"], r["T"]): r["us_per_token"] for r in report["train"]}
    goals = {}
    if 1024 in lengths and 8192 in lengths:
        for v in variants:
            goals[f"{v}_per_token_8192_over_1024"] = per_token[(v, 8192)] / per_token[(v, 1024)]
        if "dense" in variants and "sliding" in variants:
            goals["dense_over_sliding_step_8192"] = per_token[("dense", 8192)] / per_token[("sliding", 8192)]
    speed = {(r["variant"], r["context"]): r["tok_per_s"] for r in report["decode"]}
    for v in variants:
        if (v, 256) in speed and (v, 4096) in speed:
            goals[f"{v}_decode_4096_over_256"] = speed[(v, 4096)] / speed[(v, 256)]
    report["ratios"] = goals
    report["machine"]["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
