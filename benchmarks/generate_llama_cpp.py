"""gpt2kit vs llama.cpp on the CPU: the same gpt2-preset weights, batch 1, greedy (run by generate.py).

    python benchmarks/generate.py --peers llama.cpp --llama-cpp DIR [--rounds 3] [--threads 2]

DIR holds llama.cpp's `llama-bench` and `llama-quantize` (in DIR, DIR/bin or DIR/build/bin) and its
`convert_hf_to_gguf.py` + `gguf-py/`. Random gpt2-preset weights (speed does not depend on them) are
saved as a gpt2kit checkpoint, exported to GGUF f32 by `gpt2kit.export.gguf` (llama.cpp's own converter
where that module is absent), then `llama-quantize`d to q8_0 and q4_0. Pairs, timed in the same rounds: our float32 vs f32, our int8 per channel vs q8_0, our
int4 group 32 vs q4_0 (q4_0 is int4 in blocks of 32). Decode: a 32-token prompt then 128 new tokens,
ours greedy through `gpt2kit.generate` (prefill left out of the rate), llama.cpp's `llama-bench -n 128`
(token generation alone); prefill: 512 tokens (`llama-bench -p 512`; ours: one forward, last logits).
Memory: the bytes of weights a decode step reads / step time, against a streaming read measured in the
same rounds (torch.sum over a float32 buffer); peak RSS of a fresh process doing the decode run
(ours: load + generate; llama.cpp: `llama-bench -r 1`), read with os.wait4.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIRS = (("float32", "f32"), ("int8", "q8_0"), ("int4", "q4_0"))
PROMPT, NEW, PREFILL = 32, 128, 512


def find_llama_cpp(root: str | None) -> tuple[dict[str, Path] | None, str]:
    """({tool: path}, "") for the llama.cpp in `root`, or (None, why it cannot be used)."""
    if not root:
        return None, "no --llama-cpp DIR given"
    base = Path(root).expanduser()
    tools = {}
    for name in ("llama-bench", "llama-quantize"):
        hit = next((p for p in (base / name, base / "bin" / name, base / "build" / "bin" / name) if p.is_file()), None)
        if hit is None:
            return None, f"{name} not found in {base}, {base}/bin or {base}/build/bin"
        tools[name] = hit
    convert = base / "convert_hf_to_gguf.py"
    if not convert.is_file():
        return None, f"{convert} not found (llama.cpp's converter is needed to write GGUF)"
    tools["convert"] = convert
    return tools, ""


_LAUNCHER = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))\n"
)


def _peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS in bytes of a child process, from its own rusage (os.wait4). A small launcher starts it:
    a child's ru_maxrss starts at the RSS of the process it was forked from, which here is large."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=True)
    rss, code = map(int, out.stdout.split())
    if code:
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}")
    return rss


def _ours_rss(ckpt: Path, threads: int) -> int:
    """Peak RSS of a fresh process of ours loading `ckpt` and running the decode (rss_child)."""
    return _peak_rss_of([sys.executable, __file__, "--rss-child", str(ckpt), str(threads)])


def _llama_rss(tools, gguf: Path, threads: int) -> int:
    """Peak RSS of llama-bench running the same decode on `gguf`."""
    return _peak_rss_of([str(tools["llama-bench"]), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(NEW),
                         "-r", "1", "-o", "json"])


def _llama_bench(tools, gguf: Path, threads: int, prompt: int, gen: int) -> float:
    """tokens/s of one llama-bench repetition (prompt processing if prompt else token generation)."""
    cmd = [str(tools["llama-bench"]), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def build_models(tools, work: Path) -> dict[str, Path]:
    """The checkpoints and GGUF files of every precision, in `work`."""
    import torch

    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.post.quantize import QuantSpec, quantize_checkpoint
    from gpt2kit.tokenizer import Tokenizer

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
    if not data.is_dir():
        data = Path("/work/shared/data/gpt2")
    tok = Tokenizer.from_pretrained(data)  # the converter needs the GPT-2 tokenizer files
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0)).eval()
    paths = {"float32": work / "ours-float32"}
    model.save_pretrained(paths["float32"], tokenizer=tok)
    for name, spec in (("int8", QuantSpec.default(8)), ("int4", QuantSpec.default(4, group_size=32))):
        paths[name] = work / f"ours-{name}"
        quantize_checkpoint(paths["float32"], paths[name], spec, log=lambda *a, **k: None)
    paths["f32"] = work / "gpt2-f32.gguf"
    try:  # gpt2kit's own exporter (tests prove it bitwise equal to llama.cpp's converter at this shape)
        from gpt2kit.export.gguf import export_gguf

        export_gguf(model, tok, paths["f32"], dtype="f32")
        paths["exporter"] = "gpt2kit export --format gguf --dtype f32"
    except ImportError:
        env = {**os.environ, "PYTHONPATH": str(tools["convert"].parent / "gguf-py")}
        subprocess.run([sys.executable, str(tools["convert"]), str(paths["float32"]), "--outtype", "f32",
                        "--outfile", str(paths["f32"])], check=True, capture_output=True, env=env)
        paths["exporter"] = "llama.cpp convert_hf_to_gguf.py --outtype f32"
    for q in ("q8_0", "q4_0"):
        paths[q] = work / f"gpt2-{q}.gguf"
        subprocess.run([str(tools["llama-quantize"]), str(paths["f32"]), str(paths[q]), q], check=True,
                       capture_output=True)
    return paths


def _decode_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer once, position table left out."""
    wpe = model.transformer.wpe
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for t in list(wpe.parameters()) + list(wpe.buffers()):
        total -= t.numel() * t.element_size()
    return total


def rss_child(ckpt: str, threads: int) -> None:
    """Entry point of the peak-RSS process: load the checkpoint, generate the decode run, exit."""
    import torch

    torch.set_num_threads(threads)
    from gpt2kit.generate import generate
    from gpt2kit.model import GPT2

    model = GPT2.from_pretrained(ckpt).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    generate(model, idx, NEW, temperature=0.0)


def run(args) -> dict:
    tools, why = find_llama_cpp(args.llama_cpp)
    if tools is None:
        return {"benchmark": "generate-vs-llama.cpp", "skipped": f"llama.cpp unavailable: {why}"}
    import torch

    torch.set_num_threads(args.threads)
    from gpt2kit.generate import generate
    from gpt2kit.model import GPT2

    work = Path(tempfile.mkdtemp(prefix="gen-llama-"))
    try:
        paths = build_models(tools, work)
        models = {ours: GPT2.from_pretrained(paths[ours]).eval() for ours, _ in PAIRS}
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, 50257, (1, PROMPT), generator=g)
        long_idx = torch.randint(0, 50257, (1, PREFILL), generator=g)

        def ours_decode(m) -> float:
            t0 = time.perf_counter()
            generate(m, idx, 1, temperature=0.0)
            t1 = time.perf_counter()
            generate(m, idx, NEW, temperature=0.0)
            t2 = time.perf_counter()
            return (NEW - 1) / ((t2 - t1) - (t1 - t0))  # new tokens after the first, per second

        from gpt2kit.model import native
        from gpt2kit.model.quantized import generation_prefill, quant_prefill_mode

        def ours_prefill(m) -> float:
            # a prompt's forward as generation runs it (quantized products in bf16 / 8 bits: quant_prefill_mode)
            with torch.inference_mode(), generation_prefill():
                t0 = time.perf_counter()
                m(long_idx, last_only=True)
                return PREFILL / (time.perf_counter() - t0)

        for m in models.values():  # warm-up
            generate(m, idx, 4, temperature=0.0)
        stream = torch.ones(sum(p.numel() for p in models["float32"].parameters()))
        kinds = ("ours_decode", "llama_decode", "ours_prefill", "llama_prefill")
        rates = {(kind, ours): [] for ours, _ in PAIRS for kind in kinds}
        read_gb_s, loads = [], []
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            for _ in range(5):
                stream.sum()
            read_gb_s.append(5 * stream.numel() * 4 / (time.perf_counter() - t0) / 1e9)
            for ours, peer in PAIRS:
                rates[("ours_decode", ours)].append(ours_decode(models[ours]))
                rates[("llama_decode", ours)].append(_llama_bench(tools, paths[peer], args.threads, 0, NEW))
                rates[("ours_prefill", ours)].append(ours_prefill(models[ours]))
                rates[("llama_prefill", ours)].append(_llama_bench(tools, paths[peer], args.threads, PREFILL, 0))
                print(json.dumps({"round": r, "pair": ours, **{k[0]: round(v[-1], 1) for k, v in rates.items()
                                                                 if k[1] == ours}}), file=sys.stderr, flush=True)
        read = statistics.median(read_gb_s)
        results = {}
        for ours, peer in PAIRS:
            med = {kind: statistics.median(rates[(kind, ours)]) for kind in kinds}
            def same_round(a: str, b: str, ours: str = ours) -> float:
                return statistics.median([x / y for x, y in zip(rates[(a, ours)], rates[(b, ours)])])

            ours_bytes, peer_bytes = _decode_bytes(models[ours]), paths[peer].stat().st_size
            ours_rss, peer_rss = _ours_rss(paths[ours], args.threads), _llama_rss(tools, paths[peer], args.threads)
            results[f"{ours}_vs_{peer}"] = {
                "ours_decode_tok_s": round(med["ours_decode"], 1),
                "llama_cpp_decode_tok_s": round(med["llama_decode"], 1),
                "decode_ratio_same_round": round(same_round("ours_decode", "llama_decode"), 3),
                "ours_prefill_tok_s": round(med["ours_prefill"], 1),
                "llama_cpp_prefill_tok_s": round(med["llama_prefill"], 1),
                "prefill_ratio_same_round": round(same_round("ours_prefill", "llama_prefill"), 3),
                "ours_weight_mb": round(ours_bytes / 1e6, 1),
                "llama_cpp_gguf_mb": round(peer_bytes / 1e6, 1),
                # the share of the streaming-read rate a decode step's weight reads reach
                "ours_share_of_memory_ceiling": round(ours_bytes * med["ours_decode"] / (read * 1e9), 3),
                "llama_cpp_share_of_memory_ceiling": round(peer_bytes * med["llama_decode"] / (read * 1e9), 3),
                "ours_peak_rss_mb": round(ours_rss / 2**20, 1),
                "llama_cpp_peak_rss_mb": round(peer_rss / 2**20, 1),
                "rounds": {k[0]: [round(x, 1) for x in v] for k, v in rates.items() if k[1] == ours},
            }
        return {
            "benchmark": "generate-vs-llama.cpp",
            "setup": {"preset": "gpt2", "batch": 1, "prompt_len": PROMPT, "new_tokens": NEW, "prefill": PREFILL,
                      "threads": args.threads, "rounds": args.rounds, "decoding": "greedy",
                      "gguf": f"{paths['exporter']}, then llama-quantize q8_0 / q4_0",
                      "ours": "float32; int8 per channel; int4 group 32 (gpt2kit quantize)"},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_prefill": quant_prefill_mode(),
            "native_isa": native.status(),
            "cpu_flags": " ".join(f for f in native._cpu_flags().split() if f.startswith(("avx", "amx", "fma", "f16c"))),
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
            "memory_read_gb_s": round(read, 1),
            "load_avg_1m_rounds": [round(x, 2) for x in loads],
            "results": results,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_memory(args) -> dict:
    """Peak RSS only (`--memory-only`): per pair, `args.rounds` fresh processes of ours (load + the decode
    run) and one llama-bench decode, no timing, so it can run beside other work."""
    tools, why = find_llama_cpp(args.llama_cpp)
    if tools is None:
        return {"benchmark": "generate-memory-vs-llama.cpp", "skipped": f"llama.cpp unavailable: {why}"}
    work = Path(tempfile.mkdtemp(prefix="gen-llama-mem-"))
    try:
        paths = build_models(tools, work)
        results = {}
        for ours, peer in PAIRS:
            mine = [_ours_rss(paths[ours], args.threads) for _ in range(max(1, args.rounds))]
            theirs = _llama_rss(tools, paths[peer], args.threads)
            results[f"{ours}_vs_{peer}"] = {
                "ours_peak_rss_mb": [round(x / 2**20, 1) for x in mine],
                "llama_cpp_peak_rss_mb": round(theirs / 2**20, 1),
                "ratio": round(max(mine) / theirs, 2),
            }
        return {"benchmark": "generate-memory-vs-llama.cpp",
                "setup": {"preset": "gpt2", "prompt_len": PROMPT, "new_tokens": NEW, "threads": args.threads,
                          "gguf": f"{paths['exporter']}, then llama-quantize q8_0 / q4_0"},
                "results": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--rss-child":
    rss_child(sys.argv[2], int(sys.argv[3]))
