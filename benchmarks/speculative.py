"""Speculative decoding speed: plain greedy decoding of the target vs the same with a draft, same rounds.

    python benchmarks/speculative.py                                  # random gpt2 target, int4 copy as draft
    python benchmarks/speculative.py --target DIR --draft DRAFT_DIR --draft-tokens 4 --adaptive

Greedy, batch 1: the two outputs must be the same ids (`ids_equal`). Prompts are 32-token pieces of
tinyshakespeare (../shared/data) when it is there, else random ids. Without --draft, the draft is the
target quantized to int4 (group 32): a "self-draft" that shows the mechanism's ceiling (acceptance near
1), not what a distilled small model gives. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=None, help="target checkpoint (default: random gpt2-preset weights)")
    p.add_argument("--draft", default=None, help="draft checkpoint (default: the target quantized to int4 g32)")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--adaptive", action="store_true")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantize-draft", type=int, choices=(4, 8), default=None,
                   help="quantize the draft to int4 (group 32) or int8 per channel before timing")
    p.add_argument("--quantize-target", type=int, choices=(4, 8), default=None,
                   help="quantize the target too (plain decoding then times the quantized target)")
    return p.parse_args()


def prompts_for(n: int, vocab: int) -> list[list[int]]:
    import torch

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "tinyshakespeare.txt").is_file():
        data = Path("/work/shared/data")
    if (data / "tinyshakespeare.txt").is_file() and (data / "gpt2").is_dir():
        from gpt2kit.tokenizer import Tokenizer

        ids = Tokenizer.from_pretrained(data / "gpt2").encode_ordinary((data / "tinyshakespeare.txt").read_text()[:200_000])
        return [ids[i * 5000 : i * 5000 + 32] for i in range(n)]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (32,), generator=g).tolist() for _ in range(n)]


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from gpt2kit.generate import generate
    from gpt2kit.model import GPT2, GPT2Config, native
    from gpt2kit.post.quantize import QuantSpec, quantize_model
    from gpt2kit.speculative import speculative_stream

    if args.target:
        target = GPT2.from_pretrained(args.target).eval()
    else:
        torch.manual_seed(0)
        target = GPT2(GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0)).eval()
    if args.draft:
        draft = GPT2.from_pretrained(args.draft).eval()
    else:
        draft = GPT2(target.config).eval()
        draft.load_state_dict(target.state_dict())
        quantize_model(draft, QuantSpec.default(4, group_size=32))
    for model, bits in ((draft, args.quantize_draft), (target, args.quantize_target)):
        if bits:
            quantize_model(model, QuantSpec.default(4, group_size=32) if bits == 4 else QuantSpec.default(8))
            model.eval()
    prompts = prompts_for(args.prompts, target.config.vocab_size)
    N = args.new_tokens

    def plain(p):
        return generate(target, [p], N, temperature=0.0)

    def spec(p):
        s = speculative_stream(target, draft, [p], N, draft_tokens=args.draft_tokens, adaptive=args.adaptive,
                               temperature=0.0)
        for _ in s:
            pass
        return s

    spec(prompts[0])  # warm-up
    plain(prompts[0])
    times = {"plain": [], "speculative": []}
    accepted = proposed = rounds = 0
    equal = True
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for p in prompts:
            t0 = time.perf_counter()
            ref = plain(p)
            t1 = time.perf_counter()
            s = spec(p)
            t2 = time.perf_counter()
            times["plain"].append(t1 - t0)
            times["speculative"].append(t2 - t1)
            equal &= bool(torch.equal(ref, s.sequences))
            accepted, proposed, rounds = accepted + s.accepted, proposed + s.proposed, rounds + s.rounds
    n_runs = len(times["plain"])
    print(json.dumps({
        "benchmark": "speculative",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"capability {torch.backends.cpu.get_cpu_capability()}",
        "cpu_flags": " ".join(f for f in native._cpu_flags().split() if f.startswith(("avx", "amx", "fma", "f16c"))),
        "native_isa": native.status(),
        "setup": {"target": args.target or "random gpt2-preset weights",
                  "draft": args.draft or "the target quantized to int4 g32 (self-draft)",
                  "quantize_draft": args.quantize_draft, "quantize_target": args.quantize_target,
                  "draft_tokens": args.draft_tokens, "adaptive": args.adaptive, "new_tokens": N,
                  "prompts": len(prompts), "rounds": args.rounds, "threads": args.threads, "decoding": "greedy"},
        "load_avg_1m_rounds": [round(x, 2) for x in loads],
        "plain_tok_s": round(N / statistics.median(times["plain"]), 1),
        "speculative_tok_s": round(N / statistics.median(times["speculative"]), 1),
        "speedup_same_run": round(statistics.median([a / b for a, b in zip(times["plain"], times["speculative"])]), 3),
        "acceptance_rate": round(accepted / max(proposed, 1), 3),
        "tokens_per_target_forward": round(n_runs * N / max(rounds, 1), 2),
        "ids_equal": equal,
    }, indent=1))


if __name__ == "__main__":
    sys.exit(main())
