"""Tokenizer benchmark: prints JSON. Peers are measured in the same run, interleaved, medians reported.

  python benchmarks/tokenizer.py                  # everything (~ a few minutes on 2 cores)
  python benchmarks/tokenizer.py --only encode    # or: quality, learner

encode:  GPT-2 encoding throughput (MB/s of UTF-8) on tinyshakespeare and wikitext-2 valid:
         tiktoken (built from ../shared/data/gpt2 with the r50k pattern), our fast path, our pure-Python
         reference (cold word cache each round), transformers' GPT2TokenizerFast.
quality: tinyshakespeare split 90/10 by lines, vocab 8192: held-out tokens per byte for our learner and
         Hugging Face tokenizers' ByteLevel BPE trainer; the learned files re-opened by GPT2TokenizerFast
         and tiktoken must give identical ids.
learner: every .py file of this interpreter's standard library (site-packages excluded) to vocab 32768;
         wall time of ours vs the tokenizers trainer, each in a fresh process, with peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GPT2KIT_SHARED_DATA", REPO.parent / "shared" / "data"))
R50K = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def stdlib_files() -> list[Path]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). CPU time is the steadier figure for single-threaded
    work on a machine shared with other jobs; wall time is what a user waits."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------- encode
def bench_encode(rounds: int) -> dict:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from transformers import GPT2TokenizerFast

    from gpt2kit import Tokenizer
    from gpt2kit.tokenizer.bpe import ReferenceBPE

    gpt2_dir = DATA / "gpt2"
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    tt = tiktoken.Encoding(
        "gpt2", pat_str=R50K, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )
    ours = Tokenizer.from_pretrained(gpt2_dir)
    with tempfile.TemporaryDirectory() as d:
        ours.save(d)
        hf = GPT2TokenizerFast.from_pretrained(d)
        hf.model_max_length = 10**9
    results = {}
    for name in ("tinyshakespeare.txt", "wikitext2/valid.txt"):
        text = (DATA / name).read_text(encoding="utf-8")
        mb = len(text.encode("utf-8")) / 1e6
        expected = tt.encode_ordinary(text)
        assert ours.encode_ordinary(text) == expected
        assert ours.with_engine("python").encode_ordinary(text) == expected
        assert hf(text)["input_ids"] == expected
        cases = {
            "tiktoken": lambda t=text: tt.encode_ordinary(t),
            "gpt2kit_fast": lambda t=text: ours.encode_ordinary(t),
            "gpt2kit_fast_encode": lambda t=text: ours.encode(t),  # with the special-token check
            "gpt2kit_python_cold": lambda t=text: ReferenceBPE(ours.ranks, ours.merges).encode_ordinary(t),
            "transformers_GPT2TokenizerFast": lambda t=text: hf(t)["input_ids"],
        }
        wall: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(rounds):
            for k, fn in cases.items():
                w, c = timed(fn)
                wall[k].append(w)
                cpu[k].append(c)
        mbps = {k: round(mb / statistics.median(v), 2) for k, v in wall.items()}
        mbpcs = {k: round(mb / statistics.median(v), 2) for k, v in cpu.items()}
        results[name] = {
            "MB": round(mb, 3),
            "MB_per_s": mbps,
            "MB_per_cpu_s": mbpcs,
            "fast_vs_tiktoken": round(mbps["gpt2kit_fast"] / mbps["tiktoken"], 3),
            "fast_vs_tiktoken_cpu": round(mbpcs["gpt2kit_fast"] / mbpcs["tiktoken"], 3),
            "fast_vs_GPT2TokenizerFast": round(
                mbps["gpt2kit_fast"] / mbps["transformers_GPT2TokenizerFast"], 2
            ),
            "fast_vs_GPT2TokenizerFast_cpu": round(
                mbpcs["gpt2kit_fast"] / mbpcs["transformers_GPT2TokenizerFast"], 2
            ),
        }
    return results


# ---------------------------------------------------------------- quality
def hf_bpe_trainer(vocab_size: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def bench_quality(vocab_size: int = 8192) -> dict:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import GPT2TokenizerFast

    from gpt2kit import Tokenizer

    lines = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(0.9 * len(lines))
    train, heldout = "".join(lines[:cut]), "".join(lines[cut:])
    nbytes = len(heldout.encode("utf-8"))
    t0 = time.perf_counter()
    ours = Tokenizer.train(train, vocab_size, progress=False)
    t_ours = time.perf_counter() - t0
    hf, trainer = hf_bpe_trainer(vocab_size)
    t0 = time.perf_counter()
    hf.train_from_iterator([train], trainer)
    t_hf = time.perf_counter() - t0
    ids = ours.encode_ordinary(heldout)
    with tempfile.TemporaryDirectory() as d:
        ours.save(d)
        hf_loaded = GPT2TokenizerFast.from_pretrained(d)
        hf_loaded.model_max_length = 10**9
        same_hf = hf_loaded(heldout)["input_ids"] == ids
        ours.save_tiktoken_file(Path(d) / "r.tiktoken")
        tt = tiktoken.Encoding(
            "learned",
            pat_str=R50K,
            mergeable_ranks=load_tiktoken_bpe(str(Path(d) / "r.tiktoken")),
            special_tokens=ours.special_tokens,
        )
        same_tt = tt.encode_ordinary(heldout) == ids
    ours_tpb = len(ids) / nbytes
    hf_tpb = len(hf.encode(heldout).ids) / nbytes
    return {
        "vocab_size": vocab_size,
        "heldout_bytes": nbytes,
        "tokens_per_byte": {"gpt2kit": round(ours_tpb, 5), "hf_tokenizers": round(hf_tpb, 5)},
        "ratio_gpt2kit_vs_hf": round(ours_tpb / hf_tpb, 4),
        "train_seconds": {"gpt2kit": round(t_ours, 2), "hf_tokenizers": round(t_hf, 2)},
        "learned_files_identical_ids": {"GPT2TokenizerFast": same_hf, "tiktoken": same_tt},
    }


# ---------------------------------------------------------------- learner (child processes)
def learner_child(which: str, vocab_size: int, out: str) -> None:
    import resource

    def cpu_seconds() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    files = stdlib_files()
    t0, c0 = time.perf_counter(), cpu_seconds()
    if which == "gpt2kit":
        from gpt2kit import Tokenizer
        from gpt2kit.tokenizer.pretokenize import token_to_unicode

        tok = Tokenizer.train(files, vocab_size, progress=False, errors="replace", workers=2)
        merges = [f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in tok.merges]
    else:
        tok, trainer = hf_bpe_trainer(vocab_size)
        texts = (p.read_bytes().decode("utf-8", "replace") for p in files)
        tok.train_from_iterator(texts, trainer)
        merges = [
            m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]
        ]
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    rss_self = _peak_rss_mb()
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    Path(out).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "merges": merges,
                "peak_rss_MB": round(rss_self, 1),
                "peak_rss_worker_MB": round(rss_children, 1),
            }
        )
    )


def _peak_rss_mb() -> float:
    """This process's peak RSS since it started. VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec,
    so a child would report the benchmark parent's peak."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_learner(rounds: int, vocab_size: int = 32768) -> dict:
    files = stdlib_files()
    runs: dict[str, list[dict]] = {"gpt2kit": [], "hf_tokenizers": []}
    for _ in range(rounds):
        for which in runs:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = {**os.environ, "RAYON_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "true"}
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--learner-child",
                        which,
                        "--vocab-size",
                        str(vocab_size),
                        "--out",
                        f.name,
                    ],
                    check=True,
                    env=env,
                )
                runs[which].append(json.loads(Path(f.name).read_text()))
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    return {
        "corpus": f"{len(files)} .py files of the stdlib, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB",
        "vocab_size": vocab_size,
        "seconds_median": {k: round(v, 2) for k, v in med.items()},
        "seconds_all": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()},
        "ratio_gpt2kit_vs_hf": round(med["gpt2kit"] / med["hf_tokenizers"], 2),
        "peak_rss_MB": {k: max(r["peak_rss_MB"] for r in v) for k, v in runs.items()},
        "peak_rss_worker_MB": {k: max(r["peak_rss_worker_MB"] for r in v) for k, v in runs.items()},
        "cpu_seconds_median": {
            k: round(statistics.median(r["cpu_seconds"] for r in v), 2) for k, v in runs.items()
        },
        "merges": {k: len(v[0]["merges"]) for k, v in runs.items()},
        "merges_identical_to_hf_prefix": _common_prefix(
            runs["gpt2kit"][0]["merges"], runs["hf_tokenizers"][0]["merges"]
        ),
    }


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["encode", "quality", "learner"], action="append")
    ap.add_argument("--rounds", type=int, default=5, help="encode rounds (median)")
    ap.add_argument("--learner-rounds", type=int, default=1)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--learner-child", choices=["gpt2kit", "hf_tokenizers"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.learner_child:
        learner_child(args.learner_child, args.vocab_size, args.out)
        return
    only = set(args.only or ["encode", "quality", "learner"])
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }
    if "encode" in only:
        report["encode"] = bench_encode(args.rounds)
    if "quality" in only:
        report["quality"] = bench_quality()
    if "learner" in only:
        report["learner"] = bench_learner(args.learner_rounds, args.vocab_size)
    report["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
