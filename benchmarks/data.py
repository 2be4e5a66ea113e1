"""Throughput of `prepare` on the built-in corpus (the Python standard library) vs tiktoken's raw encode.

Peer (same text, same worker count, timed in the same run, interleaved):
  - tiktoken `encode_ordinary_batch(texts, num_threads=W)` (its own parallel API), and
  - a `multiprocessing.Pool(W)` mapping tiktoken `encode_ordinary` over the documents;
  the faster of the two is the baseline. Only the encode calls are timed (the texts are already in
  memory, the encoder already built).
Ours: `prepare()` in a fresh subprocess (reading files, normalization, exact + near dedup, W tokenizer
processes, writing train/val/idx/meta atomically), timed from the call to the end with the tokenizer
already loaded; and the whole `gpt2kit data prepare` command, cold, for the end-to-end picture.
Peak RSS: the timed runs are not polled (psutil's walk of /proc costs ~2 ms of CPU a sample, ~20% of a
core at 10 ms, taken from the job being timed); they report a bound from getrusage instead -- the main
process's peak plus W times the largest worker's peak. The cold CLI run is sampled every 10 ms over the
whole process tree.

    python benchmarks/data.py [--tokenizer ../shared/data/gpt2] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]

_OURS = r"""
import json, resource, sys, time
from gpt2kit.data.shards import prepare
from gpt2kit.tokenizer import Tokenizer
tok_dir, out, workers, dedup = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
tok = Tokenizer.from_pretrained(tok_dir)
tok.tiktoken_encoding  # build the encoder (the peer's is built before timing too)
def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
t, c = time.perf_counter(), cpu()
r = prepare(None, tok, out, val_fraction=0.005, workers=workers, dedup=dedup, progress=False)
seconds, cpu_seconds = time.perf_counter() - t, cpu() - c
# peak RSS bound without polling: this process's peak + each worker at the largest worker's peak (KiB)
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
       + workers * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "bytes": r.input_bytes, "rss_bound": rss,
                  "dedup": r.meta["dedup"], "tokens": sum(s["tokens"] for s in r.meta["splits"].values())}))
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the process has just ended
        return 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _pool_cpu(pool) -> float:
    """CPU seconds used so far by the pool's worker processes."""
    total = 0.0
    for w in pool._pool:
        t = psutil.Process(w.pid).cpu_times()
        total += t.user + t.system
    return total


def run_measured(cmd: list[str], sample_rss: bool = True) -> tuple[float, int, str]:
    """(wall seconds, peak RSS of the process tree in bytes (0 unsampled), stdout).

    Sampling costs ~2 ms of CPU per sample (psutil walks /proc), ~20% of a core at 10 ms: on a 2-core
    machine that is CPU taken from the measured job, so timed runs pass sample_rss=False."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ps = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(ps))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    if sample_rss:
        th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    if sample_rss:
        th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err}")
    return wall, peak[0], out


_POOL_ENC = None


def _pool_init(tok_dir: str) -> None:
    global _POOL_ENC
    _POOL_ENC = _tiktoken_encoding(tok_dir)


def _pool_encode(text: str) -> int:
    return len(_POOL_ENC.encode_ordinary(text))


def _tiktoken_encoding(tok_dir: str):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(f"{tok_dir}/vocab.bpe", f"{tok_dir}/encoder.json")
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "gpt2"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from gpt2kit.data.readers import default_corpus

    load_start = round(os.getloadavg()[0], 1)
    texts = [d.text for d in default_corpus()]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    enc = _tiktoken_encoding(args.tokenizer)
    ctx = mp.get_context("fork")
    pool = ctx.Pool(args.workers, initializer=_pool_init, initargs=(args.tokenizer,))
    pool.map(_pool_encode, ["warm up"] * args.workers)

    res: dict[str, list[float]] = {k: [] for k in ("tiktoken_threads", "tiktoken_pool", "ours", "ours_no_dedup",
                                                   "ours_cli_cold")}
    cpu: dict[str, list[float]] = {k: [] for k in ("tiktoken_threads", "tiktoken_pool", "ours", "ours_no_dedup")}
    rss: dict[str, list[int]] = {"ours": [], "ours_no_dedup": [], "ours_cli_cold": []}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            t, c = time.perf_counter(), time.process_time()
            n_threads = sum(len(x) for x in enc.encode_ordinary_batch(texts, num_threads=args.workers))
            res["tiktoken_threads"].append(nbytes / 1e6 / (time.perf_counter() - t))
            cpu["tiktoken_threads"].append(nbytes / 1e6 / (time.process_time() - c))
            t, c, pc = time.perf_counter(), time.process_time(), _pool_cpu(pool)
            n_pool = sum(pool.map(_pool_encode, texts, chunksize=8))
            res["tiktoken_pool"].append(nbytes / 1e6 / (time.perf_counter() - t))
            cpu["tiktoken_pool"].append(nbytes / 1e6 / (time.process_time() - c + _pool_cpu(pool) - pc))
            assert n_threads == n_pool
            tokens["tiktoken"] = n_threads
            for key, dedup in (("ours", "1"), ("ours_no_dedup", "0")):
                _, _, out = run_measured([sys.executable, "-c", _OURS, args.tokenizer, f"{tmp}/{key}{r}",
                                          str(args.workers), dedup], sample_rss=False)
                info = json.loads(out)
                peak = info["rss_bound"]
                res[key].append(info["bytes"] / 1e6 / info["seconds"])
                cpu[key].append(info["bytes"] / 1e6 / info["cpu_seconds"])
                rss[key].append(peak)
                tokens[key] = info["tokens"]
                if key == "ours":
                    dedup_info = info["dedup"]
            wall, peak, _ = run_measured([sys.executable, "-m", "gpt2kit.cli", "data", "prepare", "--tokenizer",
                                          args.tokenizer, "--out", f"{tmp}/cli{r}", "--workers", str(args.workers),
                                          "--val-fraction", "0.005", "--quiet"])
            res["ours_cli_cold"].append(nbytes / 1e6 / wall)
            rss["ours_cli_cold"].append(peak)
    pool.terminate()

    med = {k: statistics.median(v) for k, v in res.items()}
    base = max(med["tiktoken_threads"], med["tiktoken_pool"])
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    cbase = max(cmed["tiktoken_threads"], cmed["tiktoken_pool"])
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_start_end": [load_start, round(os.getloadavg()[0], 1)],
        "corpus": {"documents": len(texts), "mb": round(nbytes / 1e6, 2)},
        "workers": args.workers,
        "rounds": args.rounds,
        "mb_per_s_median": {k: round(v, 2) for k, v in med.items()},
        "mb_per_s_all": {k: [round(x, 2) for x in v] for k, v in res.items()},
        "mb_per_cpu_s_all": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "ratio_vs_tiktoken": {k: round(med[k] / base, 3) for k in ("ours", "ours_no_dedup", "ours_cli_cold")},
        # each round's ratio against the faster peer of the same round (pairs share the machine's load)
        "paired_ratio_median": {
            k: round(statistics.median(o / max(a, b) for o, a, b in zip(res[k], res["tiktoken_threads"],
                                                                         res["tiktoken_pool"])), 3)
            for k in ("ours", "ours_no_dedup", "ours_cli_cold")
        },
        "paired_cpu_ratio_median": {
            k: round(statistics.median(o / max(a, b) for o, a, b in zip(cpu[k], cpu["tiktoken_threads"],
                                                                         cpu["tiktoken_pool"])), 3)
            for k in ("ours", "ours_no_dedup")
        },
        "mb_per_cpu_s_median": {k: round(v, 2) for k, v in cmed.items()},
        "cpu_ratio_vs_tiktoken": {k: round(cmed[k] / cbase, 3) for k in ("ours", "ours_no_dedup")},
        "peak_rss_mb_max": {k: round(max(v) / 1e6, 1) for k, v in rss.items()},
        "tokens": tokens,
        "dedup": {k: dedup_info[k] for k in ("exact_removed", "near_removed", "threshold")},
    }, indent=2))


if __name__ == "__main__":
    main()
