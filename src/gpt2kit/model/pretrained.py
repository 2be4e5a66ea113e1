"""`GPT2`: the network with the conveniences users expect on it -- `from_pretrained`, `save_pretrained`,
`generate`. They live here, above the network, its file format and the sampling loop, so that none of
those depends on another's users (the import graph has no cycle; tests/test_import_graph.py).
"""

from __future__ import annotations

import torch

from ..generate import generate as _generate
from .gpt2 import GPT2Network
from .hf import is_quantized_checkpoint, load_pretrained, save_pretrained
from .quantized_io import load_quantized


class GPT2(GPT2Network):
    def generate(self, idx: torch.Tensor, **kwargs):
        """Sample a continuation of `idx`; see gpt2kit.generate.generate for the options."""
        return _generate(self, idx, **kwargs)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> GPT2:
        """Load a gpt2kit checkpoint directory (float or quantized), a local Hugging Face GPT-2 directory, or
        a hub id (`gpt2`, `owner/repo@revision`; see gpt2kit.hub)."""
        from ..errors import require_dir
        from ..hub import resolve_checkpoint

        path = require_dir(resolve_checkpoint(path, "model directory"), "model directory")
        if is_quantized_checkpoint(path):
            return load_quantized(path, device=device, dtype=dtype, model_class=cls)
        return load_pretrained(path, device=device, dtype=dtype, model_class=cls)

    def save_pretrained(self, path, tokenizer=None, extra: dict | None = None) -> None:
        """Write config.json, model.safetensors (HF layout), the tokenizer files and gpt2kit.json."""
        save_pretrained(self, path, tokenizer=tokenizer, extra=extra)
