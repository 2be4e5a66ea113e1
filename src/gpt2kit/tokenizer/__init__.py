"""Byte-level BPE, exactly GPT-2's: encode/decode (tiktoken fast path + pure-Python reference), learner,
file formats. See docs/tokenizer.md."""

from .core import EOS, SpecialTokenError, TokenIdError, Tokenizer
from .stream import StreamDecoder

__all__ = ["EOS", "SpecialTokenError", "StreamDecoder", "TokenIdError", "Tokenizer"]
