"""The network's linear layers: float `nn.Linear` or a quantized replacement, and the MLP's GELU + Linear.

`linear(x, layer)` is `layer(x)`. A float `nn.Linear` goes through `F.linear` -- MKL on the CPU.
Quantized layers (`gpt2kit.model.quantized`) bring their own kernels and have no float weight, so they
are called as modules.

`gelu_linear(u, layer)` is `layer(gelu(u))` (GELU in GPT-2's tanh form). In training it saves `u` for
backward and recomputes `gelu(u)` there instead of keeping both: the MLP's two [B, T, 4C] activations
are the largest per layer, and one of them costs 144 MiB at gpt2 B1xT1024 (12 x 12 MiB) for the price of
one elementwise pass per layer in backward (docs/benchmarks.md). Under `torch.compile` the plain ops are
used: Inductor's partitioner makes the same recompute decision itself.

History (docs/benchmarks.md): two sessions ran float32 CPU Linears through oneDNN with the bias and
GELU fused into the GEMM's epilogue. It measured faster for inference in one machine state and slower
in the next (prefill 1024 tokens, same-process alternation, 6-8 rounds: 1.72-1.75 s with it vs
1.52-1.64 s with F.linear; training steps 2-4% slower), so the standard path is the one kept there.

On other vendors' CPUs MKL takes its generic code path: on an AMD EPYC (Zen 5, AVX-512) its float32
GEMM ran at 180-200 GFLOP/s where oneDNN's ran at 420 (prefill shapes, 2 threads), and 2.2-2.5x faster
at 4-128 rows too. So float32 products without autograd (inference: prefill, eval, batched decode
through `model.forward`) go through oneDNN there (`inference_gemm()`); training keeps F.linear
everywhere. GPT2KIT_CPU_GEMM=mkl|onednn|auto overrides the choice.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

GEMM_ENV = "GPT2KIT_CPU_GEMM"
GEMM_CHOICES = ("auto", "mkl", "onednn")


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache
def _onednn_linear_op():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without this op
        return None


@functools.cache
def inference_gemm() -> str:
    """The backend of CPU float32 products without autograd: "onednn" on non-Intel x86 CPUs where this
    torch has oneDNN (MKL runs its generic path there), "mkl" (F.linear) otherwise or when asked."""
    choice = os.environ.get(GEMM_ENV, "auto").strip().lower() or "auto"
    if choice not in GEMM_CHOICES:
        raise UserError(f"{GEMM_ENV}={choice!r} is not one of {', '.join(GEMM_CHOICES)}")
    if choice == "mkl" or _onednn_linear_op() is None:
        return "mkl"
    if choice == "onednn":
        return "onednn"
    return "onednn" if _cpu_vendor() not in ("GenuineIntel", "") else "mkl"


def float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN for CPU float32 inference where `inference_gemm()` says so."""
    # cheapest test first: on Intel and in compiled graphs this is F.linear after one cached call
    if (
        not torch.compiler.is_compiling()
        and inference_gemm() == "onednn"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return _onednn_linear_op()(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(x); a float nn.Linear straight through F.linear (oneDNN for inference where it is faster)."""
    return float_linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


def gelu_linear(u: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(gelu(u)), GELU in its tanh form; saves only u for backward when training a float layer."""
    recompute = (
        type(layer) is nn.Linear
        and torch.is_grad_enabled()
        and (u.requires_grad or layer.weight.requires_grad)
        and not torch.compiler.is_compiling()
    )
    if recompute:
        return _GeluLinear.apply(u, layer.weight, layer.bias)
    return linear(_gelu(u), layer)


# From this many elements on, CPU float32 inference computes the GELU in gpt2kit's C kernel (the decode
# step's function): gpt2's [512, 3072] took 2.1 ms in torch's tanh GELU on 2 Zen 5 cores with AVX2 and
# 0.6 ms there (docs/benchmarks.md); it is also closer to the exact tanh GELU in the negative tail, where
# torch's 0.5 x (1 + tanh u) cancels. Smaller tensors are not worth a library call.
_NATIVE_GELU_MIN = 1 << 16


def _gelu(u: torch.Tensor) -> torch.Tensor:
    if (u.numel() >= _NATIVE_GELU_MIN and u.dtype == torch.float32 and u.device.type == "cpu"
            and u.is_contiguous() and not (torch.is_grad_enabled() and u.requires_grad)
            and not torch.compiler.is_compiling()):
        from . import native  # compiled at first use; None where it cannot be

        if native.library() is not None:
            return native.gelu(u)
    return F.gelu(u, approximate="tanh")


class _GeluLinear(torch.autograd.Function):
    """y = gelu(u) @ W^T + b, keeping u (not gelu(u)) for backward."""

    @staticmethod
    def forward(ctx, u, weight, bias):
        # under autocast F.linear casts its inputs; remember the dtype it computed in for backward
        y = F.linear(F.gelu(u, approximate="tanh"), weight, bias)
        ctx.save_for_backward(u, weight)
        ctx.compute_dtype = y.dtype
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u, weight = ctx.saved_tensors
        cdtype = ctx.compute_dtype
        w_dtype, b_dtype = ctx.param_dtypes
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(cdtype)  # [N, out]
            u2 = u.reshape(-1, u.shape[-1])  # [N, in]
            grad_u = grad_w = grad_b = None
            if ctx.needs_input_grad[1]:
                h = F.gelu(u2, approximate="tanh").to(cdtype)  # the recomputed activation
                grad_w = torch.mm(g.t(), h).to(w_dtype)
                del h
            if ctx.needs_input_grad[2] and b_dtype is not None:
                grad_b = g.sum(0).to(b_dtype)
            if ctx.needs_input_grad[0]:
                grad_h = torch.mm(g, weight.to(cdtype)).to(u.dtype)
                grad_u = torch.ops.aten.gelu_backward(grad_h, u2, approximate="tanh").view(u.shape)
        return grad_u, grad_w, grad_b
