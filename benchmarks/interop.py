"""Interop check on the real GPT-2 shape: a gpt2-preset checkpoint (random weights, seed 0; no hub access
here) with OpenAI's tokenizer, exported to GGUF (f32, q8_0) and ONNX, then run by llama.cpp and onnxruntime.

    python benchmarks/interop.py [--llama-cpp SRC] [--threads 2]

Prints JSON: export times and sizes; llama.cpp vs gpt2kit (tokenization, greedy 32 tokens, last-position
logits, f32 and q8_0); our GGUF vs llama.cpp's own converter (convert_hf_to_gguf.py in SRC, when given or
found in ~/.cache/llama.cpp): metadata keys and tensors compared one by one; onnxruntime vs gpt2kit (prefill
+ 16 cached steps). llama.cpp is loaded through llama-cpp-python's bindings (tests/export/export_helpers.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "export"))
sys.path.insert(0, str(REPO / "tests"))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp source dir (holds convert_hf_to_gguf.py)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from export_helpers import llama_cpp_module

    from gpt2kit.cli import main as cli
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    shared = Path(os.environ.get("GPT2KIT_SHARED_DATA", REPO.parent / "shared" / "data"))
    tok = Tokenizer.from_pretrained(shared / "gpt2")
    text = (shared / "tinyshakespeare.txt").read_text()[:2000] if (shared / "tinyshakespeare.txt").exists() \
        else "First Citizen: Before we proceed any further, hear me speak."
    work = Path(tempfile.mkdtemp(prefix="gpt2kit-interop-"))
    torch.manual_seed(0)
    GPT2(GPT2Config.from_preset("gpt2")).save_pretrained(work / "ckpt", tokenizer=tok)
    model = GPT2.from_pretrained(work / "ckpt").eval()
    ids = tok.encode_ordinary(text)[:64]
    report: dict = {"model": "gpt2 preset (124M), random init seed 0", "prompt_tokens": len(ids)}

    for dtype in ("f32", "q8_0"):
        _, s = timed(lambda d=dtype: cli(["export", str(work / "ckpt"), "--format", "gguf", "--dtype", d,
                                          "--out", str(work / f"m-{d}.gguf")]))
        report[f"gguf_{dtype}"] = {"export_s": round(s, 2), "bytes": (work / f"m-{dtype}.gguf").stat().st_size}
    _, s = timed(lambda: cli(["export", str(work / "ckpt"), "--format", "onnx", "--out", str(work / "onnx")]))
    report["onnx"] = {"export_s": round(s, 2), "bytes": sum(f.stat().st_size for f in (work / "onnx").iterdir())}

    with torch.no_grad():
        ref_last = model(torch.tensor([ids])).logits[0, -1].numpy()
        ref_tokens = model.generate(torch.tensor([ids]), max_new_tokens=32, temperature=0.0)[0, len(ids):].tolist()

    llama_cpp = llama_cpp_module()
    for dtype in ("f32", "q8_0"):
        f32 = llama_cpp.GGML_TYPE_F32
        llm = llama_cpp.Llama(str(work / f"m-{dtype}.gguf"), n_ctx=256, logits_all=True, verbose=False,
                              n_threads=args.threads, type_k=f32, type_v=f32)
        same_tok = llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode_ordinary(text)
        llm.eval(ids)
        last = np.array(llm.scores[len(ids) - 1])
        got = []
        for _ in range(32):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(t)
            llm.eval([t])
        report[f"gguf_{dtype}"].update({
            "tokenization_equal": same_tok, "greedy32_equal": got == ref_tokens,
            "greedy32_agree": sum(a == b for a, b in zip(got, ref_tokens)),
            "last_logits_max_abs_diff": float(np.abs(last - ref_last).max()),
            "logit_range": float(ref_last.max() - ref_last.min())})
        llm.close()

    report["vs_llama_cpp_converter"] = compare_with_converter(args.llama_cpp, work)
    report["onnx"].update(onnx_check(work / "onnx", model, ids))
    print(json.dumps(report, indent=2))


def compare_with_converter(src: str | None, work: Path) -> dict:
    """Run llama.cpp's convert_hf_to_gguf.py on the same checkpoint; compare metadata and tensors with ours."""
    found = [src] if src else glob.glob(os.path.expanduser("~/.cache/llama.cpp/*/vendor/llama.cpp"))
    if not found or not Path(found[0], "convert_hf_to_gguf.py").exists():
        return {"skipped": "llama.cpp source with convert_hf_to_gguf.py not found"}
    root = Path(found[0])
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    r = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(work / "ckpt"), "--outtype", "f32",
                        "--outfile", str(work / "theirs.gguf")], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"skipped": "converter failed: " + r.stderr.strip().splitlines()[-1][:200]}
    import gguf

    ours, theirs = gguf.GGUFReader(str(work / "m-f32.gguf")), gguf.GGUFReader(str(work / "theirs.gguf"))

    def fields(reader):
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}

    fo, ft = fields(ours), fields(theirs)
    differ = sorted(k for k in set(fo) & set(ft) if fo[k] != ft[k])
    to = {t.name: t for t in ours.tensors}
    tt = {t.name: t for t in theirs.tensors}
    equal = [n for n in to if n in tt and to[n].tensor_type == tt[n].tensor_type
             and np.array_equal(np.asarray(to[n].data), np.asarray(tt[n].data))]
    return {"tensors_ours": len(to), "tensors_theirs": len(tt), "tensors_bitwise_equal": len(equal),
            "keys_only_ours": sorted(set(fo) - set(ft)), "keys_only_theirs": sorted(set(ft) - set(fo)),
            "keys_differing": differ}


def onnx_check(directory: Path, model, ids: list[int]) -> dict:
    import onnxruntime as ort

    cfg = model.config
    sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    hd = cfg.n_embd // cfg.n_head
    past = [np.zeros((1, cfg.n_head, 0, hd), np.float32) for _ in range(2 * cfg.n_layer)]
    seq, new, errs = list(ids), np.array([ids]), []
    for _ in range(17):  # prefill + 16 cached steps
        start = len(seq) - new.shape[1]
        feed = {"input_ids": new, "attention_mask": np.ones((1, len(seq)), np.int64),
                "position_ids": np.arange(start, len(seq))[None]}
        feed.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p for i, p in enumerate(past)})
        logits, *past = sess.run(None, feed)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, -1].numpy()
        errs.append(float(np.abs(logits[0, -1] - ref).max()))
        t = int(np.argmax(logits[0, -1]))
        seq.append(t)
        new = np.array([[t]])
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=17, temperature=0.0)[0].tolist()
    return {"max_abs_logit_diff_prefill": errs[0], "max_abs_logit_diff_16_steps": max(errs[1:]),
            "greedy_equal": seq == ours}


if __name__ == "__main__":
    main()
