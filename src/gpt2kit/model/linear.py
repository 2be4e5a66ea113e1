"""nn.Linear's forward product through oneDNN on the CPU (float32), with the bias (and GELU) fused in.

Why: torch's default float32 CPU path for a Linear with bias is `addmm` on MKL, which first copies the
bias into the output and then runs the GEMM; on the AMD Zen 4 machine this project is measured on,
oneDNN's GEMM with the bias added in its epilogue is ~15-40% faster for GPT-2's shapes (forward only;
see docs/benchmarks.md). The backward products (g @ W and g^T @ x) are fast in MKL and stay there.

Anything else (GPU, other dtypes, autocast, torch.compile, a torch build without oneDNN) takes plain
F.linear. `use_onednn = False` switches the fast path off (the tests compare both paths).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_HAVE_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
use_onednn = True
# below this many rows (decoding a few tokens) oneDNN's per-call setup costs more than it saves: F.linear
MIN_ROWS = 256


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        use_onednn
        and _HAVE_ONEDNN
        and x.device.type == "cpu"
        and x.numel() >= MIN_ROWS * x.shape[-1]
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_y, weight)
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
    """layer(x), followed by GELU (tanh form) when activation == "gelu"."""
    if type(layer) is not nn.Linear:  # e.g. a quantized layer: it has its own kernels and no float weight
        y = layer(x)
        return F.gelu(y, approximate="tanh") if activation == "gelu" else y
    weight, bias = layer.weight, layer.bias
    if _onednn_ok(x, weight):
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        if not needs_grad:  # inference: GELU fused into the GEMM as well
            if activation == "gelu":
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        y = _OneDNNLinear.apply(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu" else y
