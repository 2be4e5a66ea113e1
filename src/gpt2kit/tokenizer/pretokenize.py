"""GPT-2 pre-tokenization: the split pattern, the byte<->unicode table, and the optional pre-processing.

BPE never merges across the pieces this pattern cuts, so both the learner and the encoders start here.
"""

from __future__ import annotations

import functools
import unicodedata

import regex

# OpenAI's GPT-2 split pattern exactly as tiktoken writes it for r50k/gpt2: the same splits as
# encoder.py's `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, with
# possessive quantifiers (no backtracking) and `\s++$` so a trailing whitespace run stays one piece.
# `regex` (not `re`) is needed for \p{L} / \p{N} and possessive quantifiers.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

NORMALIZATIONS = (None, "NFC", "NFKC")


@functools.lru_cache(maxsize=1)
def gpt2_regex() -> regex.Pattern:
    return regex.compile(GPT2_PATTERN)


def split_words(text: str) -> list[str]:
    """The pre-tokenized pieces of `text`, in order; joining them gives `text` back."""
    return gpt2_regex().findall(text)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (used by its file formats).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft hyphen ...) map to
    U+0100 onwards in byte order. The same order defines GPT-2's ids 0..255 for the single bytes.
    """
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@functools.lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@functools.lru_cache(maxsize=1)
def byte_order() -> list[int]:
    """Byte values in GPT-2's id order: `byte_order()[i]` is the byte whose single-byte token has id i.

    This is the order of the table's characters by code point, which is also the order Hugging Face's
    ByteLevel BPE trainer gives its alphabet, so merge tie-breaks by id agree with it.
    """
    table = bytes_to_unicode()
    return sorted(range(256), key=lambda b: ord(table[b]))


def token_to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def unicode_to_token(text: str, what: str = "token") -> bytes:
    """Inverse of `token_to_unicode`; raises KeyError naming the first character outside the table."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise KeyError(f"{what} {text!r} has character {e.args[0]!r} outside GPT-2's byte alphabet") from None


def check_normalization(normalization: str | None) -> str | None:
    from ..errors import UserError

    if normalization in ("", "none", "None"):
        return None
    if isinstance(normalization, str) and normalization.upper() in ("NFC", "NFKC"):
        return normalization.upper()
    if normalization is None:
        return None
    raise UserError(f"unknown normalization {normalization!r}: expected none, NFC or NFKC")


def make_normalizer(normalization: str | None, lowercase: bool):
    """The pre-processing function saved with a tokenizer, or None when it is the identity (GPT-2)."""
    if normalization is None and not lowercase:
        return None
    if normalization is None:
        return str.lower
    if not lowercase:
        return functools.partial(unicodedata.normalize, normalization)

    def normalize(text: str) -> str:
        return unicodedata.normalize(normalization, text).lower()

    return normalize
