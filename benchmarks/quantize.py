"""Quantization: perplexity and size of int8 / int4 against float32, and generation speed at `gpt2` size.

  python benchmarks/quantize.py --ckpt RUN/step-000400 --val-text val.txt   # quality + size + speed
  python benchmarks/quantize.py --skip-quality                              # speed only

Quality: the checkpoint (a small model trained by gpt2kit) and its int8 per-channel / int4 group-64
versions (written with `gpt2kit quantize`'s code and reloaded from disk) on the validation text
(sliding-window perplexity, gpt2kit.eval). Reload exactness: two loads give bitwise-equal logits.
Decode-path quality: generation reads the codes through small-batch kernels (int8: fbgemm dynamic int8,
which also rounds each activation row to 8 bits; int4: bf16 activations), not through the dequantized
float matmul that eval uses. So the same text is also scored one token at a time through the decoder
that gpt2kit.generate runs (windows of n_ctx tokens, KV cache), next to the full forward on the same
windows: `decode_ppl` vs `forward_ppl`.
Speed: a `gpt2` preset model (124M, random weights: speed does not depend on the values), greedy
KV-cached decoding at batch 1 with gpt2kit.generate -- float32 (its numpy matrix-vector fast path) vs the
int8 and int4 models (their code-reading kernels), interleaved rounds, medians. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def quality(ckpt: Path, val_text: str, work: Path, decode_tokens: int) -> dict:
    from gpt2kit.model import GPT2
    from gpt2kit.post.common import load_tokenizer, perplexity, weights_size
    from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint

    tok = load_tokenizer(ckpt)
    fp32 = GPT2.from_pretrained(ckpt)
    base = perplexity(fp32, tok, val_text)
    fp32_bytes = sum(p.numel() for p in fp32.parameters()) * 4
    dec_ids = tok.encode(val_text, allowed_special="all")[:decode_tokens]
    window = fp32.config.n_ctx
    out = {"checkpoint": str(ckpt), "params": sum(p.numel() for p in fp32.parameters()),
           "fp32": {"ppl": base["ppl"], "bytes": weights_size(ckpt), "scored_tokens": base["tokens"],
                    "decode_path": decode_path_ppl(fp32.eval(), dec_ids, window)}}
    for name, spec in (("int8", QuantSpec.default(8)), ("int4_g64", QuantSpec.default(4, 64)),
                       ("int8_sym", QuantSpec.default(8, symmetric=True)),
                       ("int4_g64_fp32_embeddings", QuantSpec.default(4, 64, embeddings=False))):
        t0 = time.perf_counter()
        quantize_checkpoint(ckpt, work / name, spec)
        q_s = time.perf_counter() - t0
        a, b = GPT2.from_pretrained(work / name), GPT2.from_pretrained(work / name)
        ids = torch.tensor([tok.encode(val_text[:2000], allowed_special="all")[: a.config.n_ctx]])
        exact = torch.equal(a(ids).logits, b(ids).logits) and all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        ppl = perplexity(a, tok, val_text)["ppl"]
        size = weights_size(work / name)
        dec = decode_path_ppl(a.eval(), dec_ids, window)
        dec["decode_ppl_change_vs_fp32_decode"] = dec["decode_ppl"] / out["fp32"]["decode_path"]["decode_ppl"] - 1
        out[name] = {"ppl": ppl, "ppl_change": ppl / base["ppl"] - 1, "bytes": size,
                     "size_ratio_vs_fp32": size / fp32_bytes, "reload_bitwise_exact": exact, "quantize_s": q_s,
                     "decode_path": dec}
    return out


def decode_path_ppl(model, ids: list[int], window: int) -> dict:
    """Perplexity of `ids` in windows of `window` tokens, scored (a) by one full forward per window and
    (b) one token at a time through generation's decoder (prefill of 1 token, then decode steps)."""
    import math

    import torch.nn.functional as F

    from gpt2kit.generate import _pick_decoder
    from gpt2kit.model.kv_cache import KVCache

    decoder = _pick_decoder(model, 1, "auto")
    nll_full = nll_dec = 0.0
    n = 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start: start + window]])
            T = chunk.shape[1]
            if T < 2:
                break
            full = F.log_softmax(model(chunk).logits[0, :-1].float(), -1)
            nll_full -= full.gather(-1, chunk[0, 1:, None]).sum().item()
            cache = KVCache.allocate(model.config, 1, max_len=T)
            logits = model(chunk[:, :1], kv_cache=cache, last_only=True).logits[:, -1]
            for t in range(1, T):
                nll_dec -= F.log_softmax(logits[0].float(), -1)[chunk[0, t]].item()
                if t < T - 1:
                    logits = decoder(chunk[:, t: t + 1], cache, None, None)  # [1, V]
            n += T - 1
    return {"forward_ppl": math.exp(nll_full / n), "decode_ppl": math.exp(nll_dec / n), "tokens": n,
            "decoder": type(decoder).__name__}


def speed(preset: str, new_tokens: int, rounds: int) -> dict:
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.post.common import generation_speed
    from gpt2kit.post.quantize import QuantSpec, quantize_model

    torch.manual_seed(0)
    fp32 = GPT2(GPT2Config.from_preset(preset)).eval().requires_grad_(False)
    models = {"fp32": fp32}
    for name, spec in (("int8", QuantSpec.default(8)), ("int4_g64", QuantSpec.default(4, 64))):
        m = GPT2(GPT2Config.from_preset(preset)).eval()
        m.load_state_dict(fp32.state_dict())
        quantize_model(m, spec)
        models[name] = m.requires_grad_(False)
    for m in models.values():  # warm-up: first-call allocations, kernel setup
        generation_speed(m, 4)
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            rates[name].append(generation_speed(m, new_tokens))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"preset": preset, "new_tokens": new_tokens, "rounds": rounds,
            "tokens_per_s": med, "all_rounds": rates,
            "int8_speedup_vs_fp32": med["int8"] / med["fp32"], "int4_speedup_vs_fp32": med["int4_g64"] / med["fp32"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="float checkpoint for the quality part")
    ap.add_argument("--val-text", type=Path, help="validation text for the quality part")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--decode-tokens", type=int, default=8192,
                    help="tokens of --val-text scored one at a time through the decoder (quality part)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads}
    if not args.skip_quality:
        if not (args.ckpt and args.val_text):
            ap.error("the quality part needs --ckpt and --val-text (or pass --skip-quality)")
        with tempfile.TemporaryDirectory() as work:
            result["quality"] = quality(args.ckpt, args.val_text.read_text(encoding="utf-8"), Path(work),
                                        args.decode_tokens)
    if not args.skip_speed:
        result["speed"] = speed(args.preset, args.new_tokens, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
