"""nn.Linear's inference forward through oneDNN on the CPU (float32), with the bias and GELU fused in.

Why: torch's default float32 CPU path for a Linear with bias is `addmm` on MKL, which first copies the
bias into the output and then runs the GEMM, and the GELU is one more pass over the output. With no
gradient wanted (prefill, evaluation, generation of long prompts), oneDNN's GEMM with the bias and GELU
in its epilogue was faster for GPT-2's shapes on the Zen 4 machine this project is measured on (prefill
2.44 vs 2.88 CPU-s, docs/benchmarks.md). Training uses F.linear: there, with the backward products on
MKL anyway, the oneDNN forward was a wash in one session and 2-4% slower per `gpt2` step in the next
(same-process alternation), so the plain path is kept.

Anything else (training, GPU, other dtypes, autocast, torch.compile, a torch build without oneDNN) takes
plain F.linear. `use_onednn = False` switches the fast path off (the tests compare both paths).
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


def linear(x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
    """layer(x), followed by GELU (tanh form) when activation == "gelu"."""
    if type(layer) is not nn.Linear:  # e.g. a quantized layer: it has its own kernels and no float weight
        y = layer(x)
        return F.gelu(y, approximate="tanh") if activation == "gelu" else y
    weight, bias = layer.weight, layer.bias
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad and _onednn_ok(x, weight):
        if activation == "gelu":
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    y = F.linear(x, weight, bias)
    return F.gelu(y, approximate="tanh") if activation == "gelu" else y
