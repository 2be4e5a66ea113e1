"""The pieces of a CPU prompt forward, each against what it replaced, at gpt2's shapes.

    python benchmarks/prefill_kernels.py
    GPT2KIT_NATIVE_CFLAGS="-mno-avx512f -mno-avxvnni" ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/prefill_kernels.py          # the AVX2 paths on a CPU that has more

- attention: causal SDPA over T queries in one call vs one call per 64 queries (model/gpt2.py), one layer
  of 12 heads of 64;
- gelu: torch's tanh GELU vs gpt2kit's C GELU (native.gelu) on [512, 3072];
- int4 products: gpt2kit's int4 x int8 GEMM (native.int4_gemm) vs dequantize + the float32 product
  (oneDNN or MKL, whatever float_linear picks here) at 512 rows, and vs torch's int4 kernel at 2-128 rows.
Random values; each figure is the minimum of --repeats runs, in milliseconds. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    import torch.nn.functional as F

    from gpt2kit.model import gpt2 as gpt2_module
    from gpt2kit.model import native
    from gpt2kit.model.linear import float_linear
    from gpt2kit.model.quantized import QuantLinear, _Int4Packed, _QuantStore, pack_int4
    from gpt2kit.post.quantize import quantize_tensor

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def best(fn, *a, **kw) -> float:
        fn(*a, **kw)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn(*a, **kw)
            times.append(time.perf_counter() - t)
        return round(min(times) * 1e3, 3)

    out: dict = {
        "benchmark": "prefill-kernels",
        "threads": args.threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_isa": native.status(),
        "cpu_flags": " ".join(f for f in native._cpu_flags().split() if f.startswith(("avx", "amx", "fma", "f16c"))),
    }
    with torch.inference_mode():
        attention = {}
        for T in (192, 256, 384, 512, 640, 1024):
            q, k, v = (torch.randn(1, 12, T, 64) for _ in range(3))
            attention[T] = {"one_call_ms": best(F.scaled_dot_product_attention, q, k, v, is_causal=True),
                            "chunks_of_64_ms": best(gpt2_module._causal_attention_in_chunks, q, k, v)}
        out["attention_one_layer"] = attention

        h = torch.randn(512, 3072)
        out["gelu_512x3072"] = {"torch_ms": best(F.gelu, h, approximate="tanh"),
                                "native_ms": best(native.gelu, h) if native.library() is not None else None}

        products = {}
        if native.int4_gemm_available():
            for K, N in ((768, 2304), (768, 768), (768, 3072), (3072, 768)):
                codes, scales, zeros = quantize_tensor(torch.randn(N, K) * 0.02, 4, 32)
                layer = QuantLinear(_QuantStore(pack_int4(codes), scales, zeros, 4, K), torch.zeros(N))
                kernel = layer.small_batch_kernel(1)
                row = {}
                for M in (2, 8, 32, 64, 128, 512):
                    x = torch.randn(M, K)
                    gemm = best(native.int4_gemm, kernel.blocks, x, kernel.bias, N, K)
                    if M == 512:
                        other = best(lambda x, layer: float_linear(x, layer.dequantize(), layer.bias), x, layer)
                        row[M] = {"int4_gemm_ms": gemm, "dequantize_float32_ms": other,
                                  "int4_gemm_gop_s": round(2 * M * K * N / gemm / 1e6, 1)}
                    elif _Int4Packed.available():
                        packed = _Int4Packed(layer.store, layer.bias)
                        row[M] = {"int4_gemm_ms": gemm, "torch_int4pack_ms": best(packed, x)}
                products[f"{K}x{N}"] = row
        else:
            products = f"int4 GEMM not built here ({native.status()})"
        out["int4_products"] = products
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
