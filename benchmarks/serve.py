"""`gpt2kit serve` under concurrent streaming clients, against llama.cpp's `llama-server` on the same weights.

    flock /tmp/gpt2kit-bench.lock python benchmarks/serve.py [--llama-cpp DIR] [--clients 1 4 16]
        [--requests-per-client 2] [--new-tokens 64] [--threads 2]

Random `gpt2`-preset float32 weights (speed does not depend on them) are saved as a gpt2kit checkpoint with
the GPT-2 tokenizer; llama.cpp's own `convert_hf_to_gguf.py --outtype f32` turns the same directory into a
GGUF. Each server runs alone on loopback (`gpt2kit serve --max-batch 16`; `llama-server -np 16 -cb`, both
with `--threads`, default 2), then C clients (threads sharing one httpx connection pool, released together)
each send R streaming `/v1/completions` requests one after the other: a distinct ~24-token prompt, 64 new
tokens, temperature 0. Reported per server and C: aggregate
tokens/s (all generated tokens / wall time of the round), p50/p99 time to first token (request sent ->
first text event) and inter-token latency (between text events), failed requests. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "The history of the region begins with a small settlement on the river, where traders from the north met"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become ready")


def _one_request(url: str, model: str, i: int, new_tokens: int, client=None) -> dict:
    import httpx

    body = {"model": model, "prompt": f"Request {i}. {PROMPT}", "max_tokens": new_tokens, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    times, tokens = [], 0
    try:
        stream = client.stream if client is not None else httpx.stream
        with stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                for c in msg.get("choices", []):
                    if c.get("text"):
                        times.append(time.perf_counter())
                        tokens += 1
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"ok": False, "error": repr(e)}
    if not times:
        return {"ok": False, "error": "no text"}
    return {"ok": True, "ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "events": len(times)}


def _round(url: str, model: str, clients: int, per_client: int, new_tokens: int) -> dict:
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    # one httpx client for all client threads, built before the clock starts: a fresh one per request costs
    # ~20 ms of CPU (its SSL context), which 16 threads in this process would otherwise pay on the same 2
    # cores as the server, inside the measured time to first token. No keep-alive: each request opens its
    # own connection, as separate clients would (and no request meets a connection the server has closed)
    pool = httpx.Client(limits=httpx.Limits(max_connections=clients, max_keepalive_connections=0))
    start = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        start.wait()
        for r in range(per_client):
            out = _one_request(url, model, c * 1000 + r, new_tokens, pool)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()  # every thread is up: the requests leave together
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    pool.close()
    ok = [r for r in results if r["ok"]]
    ttft = sorted(r["ttft"] for r in ok)
    itl = sorted(x for r in ok for x in r["itl"])
    events = sum(r["events"] for r in ok)

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None

    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if not r["ok"]}),
            "wall_s": round(wall, 2), "tokens": events, "tok_per_s": round(events / wall, 1),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "itl_p50_s": pct(itl, 0.5), "itl_p99_s": pct(itl, 0.99)}


def _bench_server(cmd: list[str], url: str, model: str, args, env=None) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _wait_ready(url, proc)
        _one_request(url, model, 999999, 8)  # warm-up
        return {"rounds": [_round(url, model, c, args.requests_per_client, args.new_tokens) for c in args.clients]}
    except RuntimeError as e:
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.poll() is not None else ""
        return {"skipped": f"{e}: {err}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _checkpoint(work: Path) -> Path:
    import torch

    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.tokenizer import Tokenizer

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
    if not data.is_dir():
        data = Path("/work/shared/data/gpt2")
    tok = Tokenizer.from_pretrained(data)
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0)).eval()
    path = work / "gpt2-float32"
    model.save_pretrained(path, tokenizer=tok)
    return path


def _llama_cpp(root: str | None) -> tuple[dict | None, str]:
    if not root:
        out = Path("/tmp/llama_build.out")
        root = out.read_text().strip().splitlines()[-1] if out.is_file() and out.read_text().strip() else None
    if not root:
        return None, "no --llama-cpp DIR given and /tmp/llama_build.out names none"
    base = Path(root).expanduser()
    server = next((p for p in (base / "llama-server", base / "bin" / "llama-server",
                               base / "build" / "bin" / "llama-server") if p.is_file()), None)
    convert = base / "convert_hf_to_gguf.py"
    if server is None or not convert.is_file():
        return None, f"llama-server or convert_hf_to_gguf.py not found under {base}"
    return {"server": server, "convert": convert}, ""


def _cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp source dir (default: from /tmp/llama_build.out)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ours", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpt2kit-serve-bench-"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
                    or platform.machine(), "cpu_flags": _cpu_flags(), "load_before": os.getloadavg(),
                    "new_tokens": args.new_tokens, "requests_per_client": args.requests_per_client}
    try:
        ckpt = _checkpoint(work)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
        if not args.skip_ours:
            port = _free_port()
            cmd = [sys.executable, "-m", "gpt2kit", "serve", str(ckpt), "--port", str(port), "--max-batch", "16",
                   "--max-queue", "64", "--threads", str(args.threads)]
            report["gpt2kit"] = _bench_server(cmd, f"http://127.0.0.1:{port}", "gpt2-float32", args, env)
        tools, why = _llama_cpp(args.llama_cpp)
        if tools is None:
            report["llama_server"] = {"skipped": why}
        else:
            gguf = work / "gpt2-f32.gguf"
            conv_env = {**os.environ, "PYTHONPATH": str(tools["convert"].parent / "gguf-py")}
            subprocess.run([sys.executable, str(tools["convert"]), str(ckpt), "--outtype", "f32", "--outfile",
                            str(gguf)], check=True, capture_output=True, env=conv_env)
            port = _free_port()
            cmd = [str(tools["server"]), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "16",
                   "-cb", "-c", str(16 * 256), "-t", str(args.threads), "--no-webui"]
            report["llama_server"] = _bench_server(cmd, f"http://127.0.0.1:{port}", "gpt2", args)
            report["llama_server"]["cmd"] = f"llama-server -np 16 -cb -c 4096 -t {args.threads} (GGUF f32)"
        report["load_after"] = os.getloadavg()
        ours = {r["clients"]: r for r in report.get("gpt2kit", {}).get("rounds", [])}
        peer = {r["clients"]: r for r in report.get("llama_server", {}).get("rounds", [])}
        if 1 in ours and 16 in ours:
            report["goals"] = {
                "x_single_at_16": round(ours[16]["tok_per_s"] / ours[1]["tok_per_s"], 2),
                "ttft_p50_16_over_1": round(ours[16]["ttft_p50_s"] / ours[1]["ttft_p50_s"], 2),
                "vs_llama_server_at_16": round(ours[16]["tok_per_s"] / peer[16]["tok_per_s"], 2) if 16 in peer else None,
                "failed": sum(r["failed"] for r in ours.values()),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
