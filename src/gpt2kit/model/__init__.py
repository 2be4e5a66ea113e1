"""The GPT-2 network, its configuration, KV cache and checkpoint format (see docs/model.md).

Names are re-exported lazily: importing a submodule (e.g. `gpt2kit.model.kv_cache` from the sampling
loop) does not import the whole package, which keeps the import graph free of cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

_EXPORTS = {
    "GPT2": "pretrained",
    "GPT2Network": "gpt2",
    "GPT2Output": "gpt2",
    "GPT2Config": "config",
    "PRESETS": "config",
    "ConfigError": "config",
    "KVCache": "kv_cache",
    "check_tokenizer_fits": "hf",
}

__all__ = ["GPT2", "PRESETS", "ConfigError", "GPT2Config", "GPT2Network", "GPT2Output", "KVCache",
           "check_tokenizer_fits"]

__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from .config import PRESETS, ConfigError, GPT2Config
    from .gpt2 import GPT2Network, GPT2Output
    from .hf import check_tokenizer_fits
    from .kv_cache import KVCache
    from .pretrained import GPT2
