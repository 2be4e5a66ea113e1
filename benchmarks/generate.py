"""Generation speed: gpt2kit vs transformers `generate`, same weights, same run, interleaved.

    python benchmarks/generate.py                       # gpt2 preset, fp32, batch 1, 32 + 200 tokens
    python benchmarks/generate.py --batch 8 --rounds 3
    python benchmarks/generate.py --variants ours,hf,ours_torch,ours_bf16,hf_bf16,ours_compile
    python benchmarks/generate.py --peers llama.cpp --llama-cpp DIR   # see generate_llama_cpp.py

Random weights (speed does not depend on their values), greedy decoding so every contender produces
the same ids (checked: `ids_equal`), no early stop. Each round times every variant once, in turn, so
load from other processes hits them alike; we report medians and the median same-round ratio to
transformers. Rates count new tokens only; `decode_tok_s` leaves the prefill out, and
`decode_weight_gb_s` is the bytes of weights a decode step must read divided by its time: compare it
with the machine's memory bandwidth (PERF-NOTES: ~28 GB/s for a plain torch.sum here).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="ours,hf,ours_torch",
                   help="comma list of: ours (default path), ours_torch (model.forward every step), ours_bf16, "
                        "ours_compile (torch.compile'd model.forward), hf, hf_bf16")
    p.add_argument("--peers", choices=["transformers", "llama.cpp"], default="transformers",
                   help="llama.cpp: float32/int8/int4 against llama.cpp f32/q8_0/q4_0 (generate_llama_cpp.py)")
    p.add_argument("--llama-cpp", metavar="DIR", default=None,
                   help="llama.cpp directory (llama-bench, llama-quantize, convert_hf_to_gguf.py)")
    p.add_argument("--memory-only", action="store_true",
                   help="with --peers llama.cpp: only each pair's peak RSS (--rounds fresh processes of ours "
                        "each), no timing")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.peers == "llama.cpp":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import generate_llama_cpp

        report = generate_llama_cpp.run_memory(args) if args.memory_only else generate_llama_cpp.run(args)
        report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
        print(json.dumps(report, indent=1))
        return
    import torch

    torch.set_num_threads(args.threads)
    import transformers

    from gpt2kit.generate import generate
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config.from_preset(args.preset, dropout=0.0, attn_dropout=0.0)
    ours = GPT2(config).eval()
    tmp = tempfile.mkdtemp(prefix="gen-bench-")
    ours.save_pretrained(tmp)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=g)
    N = args.new_tokens

    models = {}

    def ours_model(kind: str):
        if kind not in models:
            if kind == "bf16":
                models[kind] = GPT2.from_pretrained(tmp, dtype=torch.bfloat16).eval()
            elif kind == "compile":
                models[kind] = torch.compile(ours, dynamic=True)
            elif kind == "hf_bf16":
                models[kind] = transformers.GPT2LMHeadModel.from_pretrained(tmp, dtype=torch.bfloat16).eval()
                models[kind].generation_config.eos_token_id = None
                models[kind].generation_config.pad_token_id = 0
        return models[kind]

    def run_hf(model):
        with torch.inference_mode():
            return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=N, min_new_tokens=N,
                                  do_sample=False)

    variants = {
        "ours": lambda: generate(ours, idx, N, temperature=0.0),
        "ours_torch": lambda: generate(ours, idx, N, temperature=0.0, fast=False),
        "ours_bf16": lambda: generate(ours_model("bf16"), idx, N, temperature=0.0),
        "ours_compile": lambda: generate(ours_model("compile"), idx, N, temperature=0.0, fast=False),
        "hf": lambda: run_hf(hf),
        "hf_bf16": lambda: run_hf(ours_model("hf_bf16")),
    }
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variants: {sorted(unknown)}")

    # prefill alone (prompt -> first token), to separate it from the per-token decode rate
    def prefill_time(name):
        fn = {
            "hf": lambda: run_hf_n(hf, 1), "hf_bf16": lambda: run_hf_n(ours_model("hf_bf16"), 1),
        }.get(name)
        if fn is None:
            model = {"ours": ours, "ours_torch": ours, "ours_bf16": ours_model("bf16"),
                     "ours_compile": ours_model("compile")}[name]
            fn = lambda: generate(model, idx, 1, temperature=0.0, fast="auto" if name in ("ours", "ours_bf16") else False)  # noqa: E731
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def run_hf_n(model, n):
        with torch.inference_mode():
            return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)

    outputs, warmup_s = {}, {}
    for name in names:  # warm-up (and compilation) outside the timed rounds: a short run
        t = time.perf_counter()
        prefill_time(name)
        warmup_s[name] = round(time.perf_counter() - t, 2)

    # the float32 ceiling, measured in the same rounds: how fast this machine streams the weights'
    # bytes at all (torch.sum over a buffer of the same size, which reads and adds -- no matrix work)
    n_weights = sum(p.numel() for p in ours.parameters()) - ours.transformer.wpe.weight.numel()
    stream = torch.ones(n_weights)
    stream.sum()
    read_gb_s = []

    times = {n: [] for n in names}
    prefills = {n: [] for n in names}
    for r in range(args.rounds):
        t = time.perf_counter()
        for _ in range(5):
            stream.sum()
        read_gb_s.append(5 * stream.numel() * 4 / (time.perf_counter() - t) / 1e9)
        for name in names:
            prefills[name].append(prefill_time(name))
            t = time.perf_counter()
            outputs[name] = variants[name]()
            times[name].append(time.perf_counter() - t)
            print(json.dumps({"round": r, "variant": name, "seconds": round(times[name][-1], 3),
                              "prefill_s": round(prefills[name][-1], 4)}), file=sys.stderr, flush=True)

    # bytes a decode step reads: every weight matrix once (the tied head counted once), at its dtype
    results = {}
    ref = "hf" if "hf" in names else None
    for name in names:
        total = statistics.median(times[name])
        pre = statistics.median(prefills[name])
        decode = statistics.median([(t - p) / max(N - 1, 1) for t, p in zip(times[name], prefills[name])])
        bytes_per_weight = 2 if "bf16" in name else 4
        r = {
            "new_tok_s": round(args.batch * N / total, 2),
            "seconds": round(total, 3),
            "prefill_s": round(pre, 4),
            "decode_ms_per_step": round(decode * 1e3, 2),
            "decode_tok_s": round(args.batch / decode, 2),
            "decode_weight_gb_s": round(n_weights * bytes_per_weight / decode / 1e9, 1),
            "warmup_s": warmup_s[name],
            "times_s": [round(t, 3) for t in times[name]],
        }
        if ref and name != ref:
            r["ratio_vs_hf_same_round"] = round(statistics.median(
                [tr / to for to, tr in zip(times[name], times[ref])]), 3)
            r["ids_equal_hf"] = bool(torch.equal(outputs[name], outputs[ref]))
        results[name] = r
    read = statistics.median(read_gb_s)
    ceiling = {
        "memory_read_gb_s": round(read, 1),
        "memory_read_gb_s_rounds": [round(x, 1) for x in read_gb_s],
        "float32_weight_mb_per_token": round(n_weights * 4 / 1e6, 1),
        # a decode step can go no faster than reading its weights once, with nothing else to do
        "float32_ceiling_decode_tok_s": round(args.batch * read * 1e9 / (n_weights * 4), 1),
    }
    if "hf" in results:
        ceiling["hf_decode_share_of_ceiling"] = round(results["hf"]["decode_tok_s"] / ceiling["float32_ceiling_decode_tok_s"], 3)
        ceiling["ceiling_vs_hf_decode"] = round(ceiling["float32_ceiling_decode_tok_s"] / results["hf"]["decode_tok_s"], 3)
    if "ours" in results:
        ceiling["ours_decode_share_of_ceiling"] = round(results["ours"]["decode_tok_s"] / ceiling["float32_ceiling_decode_tok_s"], 3)

    print(json.dumps({
        "benchmark": "generate",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
        "setup": {"preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": N,
                  "threads": args.threads, "rounds": args.rounds, "decoding": "greedy", "dtype": "float32 unless *_bf16"},
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "results": results,
        "float32_memory_ceiling": ceiling,
    }, indent=1))


if __name__ == "__main__":
    main()
