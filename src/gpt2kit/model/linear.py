"""One entry point for the network's linear layers: float `nn.Linear` or a quantized replacement.

`linear(x, layer, activation)` is `layer(x)` (then GELU, tanh form, for the MLP's first layer). A float
`nn.Linear` goes through `F.linear` -- MKL on the CPU. Quantized layers (`gpt2kit.model.quantized`) bring
their own kernels and have no float weight, so they are called as modules.

History (docs/benchmarks.md): two sessions ran float32 CPU Linears through oneDNN with the bias and
GELU fused into the GEMM's epilogue. It measured faster for inference in one machine state and slower
in the next (prefill 1024 tokens, same-process alternation, 6-8 rounds: 1.72-1.75 s with it vs
1.52-1.64 s with F.linear; training steps 2-4% slower), so the standard path is the one kept.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear(x: torch.Tensor, layer: nn.Module, activation: str | None = None) -> torch.Tensor:
    """layer(x), followed by GELU (tanh form) when activation == "gelu"."""
    y = F.linear(x, layer.weight, layer.bias) if type(layer) is nn.Linear else layer(x)
    return F.gelu(y, approximate="tanh") if activation == "gelu" else y
