"""Incremental decoding for streaming generation: never emit half of a multi-byte UTF-8 character.

A token can end in the middle of a character (GPT-2 splits many emoji and CJK characters across tokens),
so the decoder keeps the incomplete tail bytes until the token that completes them arrives. Invalid bytes
become U+FFFD, so the concatenated output equals `Tokenizer.decode(all_ids)`.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable


class StreamDecoder:
    def __init__(self, token_bytes: Callable[[list[int]], bytes]):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Take one token id; return the text it completes (possibly "")."""
        return self._utf8.decode(self._token_bytes([token_id]), final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        return self._utf8.decode(self._token_bytes(list(token_ids)), final=False)

    def flush(self) -> str:
        """End of stream: whatever bytes are still pending, as U+FFFD if they never completed."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
