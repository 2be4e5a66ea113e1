"""The GPT-2 network, its configuration, KV cache and checkpoint format (see docs/model.md)."""

from .config import PRESETS, ConfigError, GPT2Config
from .gpt2 import GPT2, GPT2Output
from .hf import check_tokenizer_fits
from .kv_cache import KVCache

__all__ = ["GPT2", "PRESETS", "ConfigError", "GPT2Config", "GPT2Output", "KVCache", "check_tokenizer_fits"]
