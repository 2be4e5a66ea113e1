"""Language-modelling metrics from one summed negative log-likelihood.

Every number here derives from `nll` (natural-log, summed over the scored tokens) and a count of units:
tokens for cross-entropy and perplexity, characters for bits per character, UTF-8 bytes for bits per
byte, words for word-level perplexity. Characters, bytes and words are counted on the *original* text
(before any detokenizer), as the GPT-2 paper and lm-evaluation-harness do, so the value does not depend on
the model's tokenizer and stays comparable across models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LN2 = math.log(2.0)


def count_words(text: str) -> int:
    """Whitespace-separated words of `text` (the unit of word-level perplexity)."""
    return len(text.split())


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


@dataclass
class LMStats:
    """Summed NLL (nats) over `tokens` scored tokens of a text with the given unit counts."""

    nll: float = 0.0
    tokens: int = 0
    characters: int = 0
    bytes: int = 0
    words: int = 0

    def add_text(self, text: str) -> None:
        """Count the units of one (original, not detokenized) text."""
        self.characters += len(text)
        self.bytes += count_bytes(text)
        self.words += count_words(text)

    @property
    def ce(self) -> float:
        """Cross-entropy in nats per token."""
        return self.nll / self.tokens

    @property
    def bits_per_token(self) -> float:
        return self.ce / LN2

    @property
    def ppl(self) -> float:
        """Token perplexity: exp of the mean NLL per token."""
        return math.exp(self.ce)

    @property
    def bpc(self) -> float:
        """Bits per character of the original text."""
        return self.nll / LN2 / self.characters

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte of the original text."""
        return self.nll / LN2 / self.bytes

    @property
    def byte_ppl(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def word_ppl(self) -> float:
        """Perplexity per word of the original text: exp(total NLL / words)."""
        return math.exp(self.nll / self.words)

    def as_dict(self) -> dict[str, float | int]:
        """All metrics as plain numbers (NaN where a count is zero)."""

        def safe(fn):
            try:
                return fn()
            except (ZeroDivisionError, OverflowError):
                return float("nan") if self.tokens == 0 else float("inf")

        return {
            "ppl": safe(lambda: self.ppl),
            "ce": safe(lambda: self.ce),
            "bits_per_token": safe(lambda: self.bits_per_token),
            "bpc": safe(lambda: self.bpc),
            "bpb": safe(lambda: self.bpb),
            "byte_ppl": safe(lambda: self.byte_ppl),
            "word_ppl": safe(lambda: self.word_ppl),
            "nll": self.nll,
            "tokens": self.tokens,
            "characters": self.characters,
            "bytes": self.bytes,
            "words": self.words,
        }
