"""Evaluation speed: batched vs one-at-a-time scoring, and perplexity tokens/s against transformers.

  python benchmarks/eval.py scoring    --preset gpt2-mini --requests 192
  python benchmarks/eval.py perplexity --preset gpt2 --windows 6

`scoring` times `score_requests` on LAMBADA-shaped requests (contexts of 60-110 tokens, targets of 1-3
tokens cut from WikiText) with batch size 1 and with --batch-size, interleaved, medians of --repeats.
`perplexity` saves a random-init model of the preset with the GPT-2 tokenizer, then times
`gpt2kit eval`'s sliding-window perplexity and Hugging Face's recipe with transformers' GPT2LMHeadModel on
the same directory and the same text (stride n_ctx/2), interleaved; it also reports both perplexities.
Prints one JSON object. Needs ../shared/data (GPT-2 files, WikiText-2 valid).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def make_model(preset: str, n_ctx: int | None, seed: int = 0):
    from gpt2kit.model import GPT2, GPT2Config

    config = GPT2Config.from_preset(preset)
    if n_ctx:
        config = dataclasses.replace(config, n_ctx=n_ctx)
    torch.manual_seed(seed)
    return GPT2(config).eval()


def wikitext_tokens(tokenizer, n_chars: int) -> list[int]:
    text = (DATA / "wikitext2" / "valid.txt").read_text(encoding="utf-8")[:n_chars]
    return tokenizer.encode_ordinary(text)


def bench_scoring(args) -> dict:
    from gpt2kit.eval.scoring import Request, score_requests
    from gpt2kit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(DATA / "gpt2")
    model = make_model(args.preset, None)
    tokens = wikitext_tokens(tokenizer, 400_000)
    rng = random.Random(0)
    requests = []
    for _ in range(args.requests):
        n_context, n_target = rng.randint(60, 110), rng.randint(1, 3)
        start = rng.randrange(0, len(tokens) - n_context - n_target)
        requests.append(Request(tokens[start : start + n_context],
                                tokens[start + n_context : start + n_context + n_target]))
    n_tokens = sum(len(r.context) + len(r.continuation) - 1 for r in requests)

    def run(batch_size: int) -> tuple[float, list[float]]:
        t = time.perf_counter()
        scores = score_requests(model, requests, batch_size=batch_size)
        return time.perf_counter() - t, [s.logprob for s in scores]

    run(args.batch_size)  # warm-up
    single, batched = [], []
    for _ in range(args.repeats):
        t1, lp1 = run(1)
        tb, lpb = run(args.batch_size)
        single.append(t1)
        batched.append(tb)
    max_diff = max(abs(a - b) for a, b in zip(lp1, lpb))
    s, b = statistics.median(single), statistics.median(batched)
    return {
        "part": "scoring", "preset": args.preset, "requests": len(requests), "tokens_fed": n_tokens,
        "batch_size": args.batch_size, "single_s": round(s, 3), "batched_s": round(b, 3),
        "single_req_per_s": round(len(requests) / s, 2), "batched_req_per_s": round(len(requests) / b, 2),
        "speedup": round(s / b, 2), "max_logprob_diff": max_diff,
        "single_runs_s": [round(x, 3) for x in single], "batched_runs_s": [round(x, 3) for x in batched],
    }


def hf_recipe(model, input_ids: torch.Tensor, stride: int) -> tuple[float, int]:
    """Hugging Face's sliding-window perplexity loop (exact token count for each window's loss)."""
    max_length = model.config.n_positions
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        ids = input_ids[:, begin:end]
        target = ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def bench_perplexity(args) -> dict:
    from transformers import GPT2LMHeadModel

    from gpt2kit.eval.perplexity import evaluate_text
    from gpt2kit.model import GPT2
    from gpt2kit.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(DATA / "gpt2")
    model = make_model(args.preset, args.n_ctx)
    n_ctx = model.config.n_ctx
    stride = n_ctx // 2
    want = n_ctx + (args.windows - 1) * stride  # tokens for exactly --windows windows
    text = (DATA / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    # the shortest prefix (in characters) with at least `want` tokens
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode_ordinary(text[:mid])) >= want:
            hi = mid
        else:
            lo = mid + 1
    text = text[:lo]

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "ckpt", tokenizer=tokenizer)
        ours = GPT2.from_pretrained(Path(tmp) / "ckpt").eval()
        hf = GPT2LMHeadModel.from_pretrained(Path(tmp) / "ckpt").eval()
    ids = torch.tensor([tokenizer.encode_ordinary(text)])

    def run_ours(dtype=None):
        m = ours if dtype is None else ours.to(dtype)
        t = time.perf_counter()
        r = evaluate_text(m, tokenizer, text, stride=stride, batch_size=args.batch_size)
        return time.perf_counter() - t, r["ppl"], r["tokens"]

    def run_hf():
        t = time.perf_counter()
        ppl, n = hf_recipe(hf, ids, stride)
        return time.perf_counter() - t, ppl, n

    ours_t, hf_t = [], []
    for _ in range(args.repeats):
        t, ppl_ours, n_ours = run_ours()
        ours_t.append(t)
        t, ppl_hf, n_hf = run_hf()
        hf_t.append(t)
    result = {
        "part": "perplexity", "preset": args.preset, "n_ctx": n_ctx, "stride": stride,
        "windows": args.windows, "scored_tokens": n_ours, "batch_size": args.batch_size,
        "ours_s": round(statistics.median(ours_t), 3), "hf_s": round(statistics.median(hf_t), 3),
        "ours_tokens_per_s": round(n_ours / statistics.median(ours_t), 1),
        "hf_tokens_per_s": round(n_hf / statistics.median(hf_t), 1),
        "ratio_ours_vs_hf": round(statistics.median(hf_t) / statistics.median(ours_t), 3),
        "ppl_ours": ppl_ours, "ppl_hf": ppl_hf, "ppl_rel_diff": abs(ppl_ours - ppl_hf) / ppl_hf,
        "ours_runs_s": [round(x, 3) for x in ours_t], "hf_runs_s": [round(x, 3) for x in hf_t],
    }
    if args.bf16:
        t, ppl_bf16, _ = run_ours(torch.bfloat16)
        result.update(ours_bf16_s=round(t, 3), ours_bf16_tokens_per_s=round(n_ours / t, 1), ppl_bf16=ppl_bf16)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["scoring", "perplexity"])
    p.add_argument("--preset", default=None, help="model preset (default gpt2-mini / gpt2)")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also time ours in bfloat16 (perplexity)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "scoring":
        args.preset = args.preset or "gpt2-mini"
        args.batch_size = args.batch_size or 32
        result = bench_scoring(args)
    else:
        args.preset = args.preset or "gpt2"
        args.batch_size = args.batch_size or 4
        result = bench_perplexity(args)
    result.update(date=time.strftime("%Y-%m-%d"), machine=f"{platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads", torch=torch.__version__,
                  command="python " + " ".join(sys.argv))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
