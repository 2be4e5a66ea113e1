"""gpt2kit: GPT-2 from raw text to a trained, evaluated, compressed model.

The public API is re-exported here lazily, so `import gpt2kit` (and the tokenizer alone) does not pay
for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Tokenizer": "gpt2kit.tokenizer",
    "GPT2": "gpt2kit.model",
    "GPT2Config": "gpt2kit.model",
    "KVCache": "gpt2kit.model",
    "UserError": "gpt2kit.errors",
}

__all__ = ["GPT2", "GPT2Config", "KVCache", "Tokenizer", "UserError", "__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .errors import UserError
    from .model import GPT2, GPT2Config, KVCache
    from .tokenizer import Tokenizer
