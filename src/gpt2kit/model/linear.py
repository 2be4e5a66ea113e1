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
1.52-1.64 s with F.linear; training steps 2-4% slower), so the standard path is the one kept.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(x); a float nn.Linear straight through F.linear."""
    return F.linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)


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
    return linear(F.gelu(u, approximate="tanh"), layer)


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
