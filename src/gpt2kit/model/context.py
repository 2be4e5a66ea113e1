"""Context extension: grow a trained model's learned position table to a longer n_ctx."""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ConfigError


def extend_positions(model: nn.Module, n_ctx: int) -> None:
    """Give `model` (a GPT2Network) n_ctx learned positions; row i >= the old n_ctx starts as a copy of
    row i mod old n_ctx (tiled), so every new position begins at an embedding the model already knows."""
    old = model.config.n_ctx
    if n_ctx < old:
        raise ConfigError(f"--n-ctx {n_ctx} is shorter than the checkpoint's context n_ctx={old}; context "
                          "extension only grows it")
    if n_ctx == old:
        return
    wpe = model.transformer.wpe
    with torch.no_grad():
        rows = torch.arange(n_ctx, device=wpe.weight.device) % old
        grown = nn.Embedding(n_ctx, wpe.embedding_dim, device=wpe.weight.device, dtype=wpe.weight.dtype)
        grown.weight.copy_(wpe.weight[rows])
    model.transformer.wpe = grown
    model.config = model.config.replace(n_ctx=n_ctx)
