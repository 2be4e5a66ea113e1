"""One prepared check of the CUDA path on a lent GPU; prints one JSON object per measurement.

What it proves and times (device time is scarce, so everything runs in one call):
1. the card's measured bf16 matmul rate (8192^3, the MFU denominator) and fp32/bf16 parity of our model
   on the GPU against the CPU float64 reference;
2. SDPA's flash kernel is really used (forced with `sdpa_kernel(FLASH_ATTENTION)`, which raises otherwise);
3. training-step throughput of the `gpt2` preset with bf16 autocast and fused AdamW, eager and
   `torch.compile`d, as tokens/s and MFU (PaLM's 6N + 12·L·d·T FLOPs per token); `eager-plain-gelu`
   is the eager step without the MLP's GELU recompute (gpt2kit.model.linear), to measure what it saves;
4. generation on the GPU: 64 KV-cache decode steps against one full forward (fp32), then greedy
   tokens/s of `gpt2kit.generate` at batch 1 and 16, float32 and bfloat16 weights.
The trainer itself (DDP over NCCL through torchrun) is run by the shell command beside this script.

Usage: python benchmarks/gpu_check.py [--batch-size 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F


def emit(**kv):
    print(json.dumps(kv), flush=True)


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Median seconds per call of fn, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def matmul_peak() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, warmup=3, iters=10)
    return 2 * n**3 / t


def parity_check():
    from gpt2kit.model import GPT2, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config.from_preset("gpt2-mini", dropout=0.0, attn_dropout=0.0)
    model = GPT2(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 256))
    with torch.no_grad():
        ref = model.double()(idx).logits.float()
        model.float()
        torch.backends.cuda.matmul.allow_tf32 = False
        gpu = model.cuda()(idx.cuda()).logits.float().cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu_bf16 = model(idx.cuda()).logits.float().cpu()
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    emit(check="parity_gpu_vs_cpu_float64", fp32_rel_err=rel(gpu), bf16_autocast_rel_err=rel(gpu_bf16))


def train_step_bench(batch_size: int, steps: int, peak: float, compile_: bool, force_flash: bool,
                     loss_chunk: int = 0, plain_loss: bool = False, plain_gelu: bool = False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.model import gpt2 as gpt2_module
    from gpt2kit.model import linear as linear_module
    from gpt2kit.model import loss as loss_module

    # plain_gelu: the MLP keeps gelu(u) for backward, as autograd does by default
    gpt2_module.gelu_linear = (
        (lambda u, layer: linear_module.linear(F.gelu(u, approximate="tanh"), layer))
        if plain_gelu else linear_module.gelu_linear
    )
    if loss_chunk:  # logits per chunk of the fused head + cross-entropy on CUDA
        loss_module._CHUNK_ELEMENTS["cuda"] = loss_chunk
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0)
    model = GPT2(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    run = torch.compile(model) if compile_ else model
    T = cfg.n_ctx
    idx = torch.randint(0, cfg.vocab_size, (batch_size, T + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]

    def step():
        ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if force_flash else contextlib.nullcontext()
        with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(x, targets=y, return_logits=plain_loss).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first_loss = float(step())
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0
    sec = cuda_time(step, warmup=3, iters=steps)
    tokens = batch_size * T
    n = model.num_params()
    flops_per_token = 6 * n + 12 * cfg.n_layer * cfg.n_embd * T
    tps = tokens / sec
    emit(
        check="train_step_gpt2",
        compile=compile_,
        flash_forced=force_flash,
        gelu="plain" if plain_gelu else "recompute",
        loss="plain" if plain_loss else f"chunked({loss_module._CHUNK_ELEMENTS['cuda']})",
        batch=batch_size,
        block=T,
        first_step_s=round(first_step_s, 2),
        step_ms=round(sec * 1e3, 2),
        tokens_per_s=round(tps),
        mfu=round(tps * flops_per_token / peak, 4),
        first_loss=round(first_loss, 4),
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )


def sdpa_flash_smoke():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(4, 12, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        y.sum().backward()
    ref = F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    emit(check="sdpa_flash", ok=True, rel_err=float((y.float() - ref).norm() / ref.norm()))


def generation_check():
    from gpt2kit.generate import generate
    from gpt2kit.model import GPT2, GPT2Config
    from gpt2kit.model.kv_cache import KVCache

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = GPT2Config.from_preset("gpt2", dropout=0.0, attn_dropout=0.0)
    model = GPT2(cfg).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 80), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.allocate(cfg, batch_size=2, max_len=80, device="cuda", dtype=torch.float32)
        steps = [model(ids[:, :16], kv_cache=cache).logits]
        for t in range(16, 80):  # 64 single-token steps on the cache
            steps.append(model(ids[:, t:t + 1], kv_cache=cache).logits)
        inc = torch.cat(steps, dim=1)
    emit(check="kv_cache_vs_full_forward_fp32", steps=64, max_abs_diff=float((inc - full).abs().max()))

    from gpt2kit.model import gpt2 as gpt2_module

    prompt_len, new = 32, 256
    ours = gpt2_module._attention_backends
    for dtype, backends in ((torch.float32, "default"), (torch.bfloat16, "default"), (torch.bfloat16, "cudnn-allowed")):
        model = model.to(dtype)
        # cudnn-allowed: SDPA picks any kernel on the cache, as before the fix (cuDNN builds a graph per length)
        gpt2_module._attention_backends = (lambda *a: contextlib.nullcontext()) if backends != "default" else ours
        for batch in (1, 16):
            if backends != "default" and batch > 1:
                continue
            idx = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device="cuda")
            generate(model, idx, max_new_tokens=8, temperature=0.0)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = generate(model, idx, max_new_tokens=new, temperature=0.0)
            torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            emit(check="generate_greedy_gpt2", dtype=str(dtype).removeprefix("torch."), sdpa=backends, batch=batch,
                 prompt=prompt_len, new_tokens=out.shape[1] - prompt_len, seconds=round(sec, 3),
                 tokens_per_s=round(batch * (out.shape[1] - prompt_len) / sec, 1))
    gpt2_module._attention_backends = ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default="eager,compile",
                    help="comma list of eager | eager-plain-gelu | compile | compile-bigchunk | compile-plain")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    emit(check="device", name=props.name, torch=torch.__version__, sms=props.multi_processor_count,
         mem_gib=round(props.total_memory / 2**30, 1))
    peak = matmul_peak()
    emit(check="bf16_matmul_8192", tflops=round(peak / 1e12, 1))
    parity_check()
    sdpa_flash_smoke()
    variants = {
        "eager": dict(compile_=False, force_flash=True),
        "eager-plain-gelu": dict(compile_=False, force_flash=True, plain_gelu=True),
        "compile": dict(compile_=True, force_flash=False),
        "compile-bigchunk": dict(compile_=True, force_flash=False, loss_chunk=2**27),
        "compile-plain": dict(compile_=True, force_flash=False, plain_loss=True),
    }
    for name in args.variants.split(","):
        try:
            train_step_bench(args.batch_size, args.steps, peak, **variants[name])
        except Exception as e:  # report and go on: one failure must not cost the other measurements
            emit(check="train_step_gpt2", variant=name, error=f"{type(e).__name__}: {e}"[:500])
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if not args.skip_generation:
        try:
            generation_check()
        except Exception as e:
            emit(check="generation", error=f"{type(e).__name__}: {e}"[:500])


if __name__ == "__main__":
    main()
