"""The readable pure-Python BPE encoder: the reference the tiktoken fast path is proven against.

It is OpenAI's original `encoder.py` algorithm on integer ids: split text with the GPT-2 pattern, turn
each piece into its bytes' ids, then repeatedly merge the adjacent pair that came earliest in the merge
list (all its non-overlapping occurrences, left to right) until no adjacent pair is a merge. Results are
cached per piece: natural text repeats a small set of words, so most pieces are dictionary hits.
"""

from __future__ import annotations

from .pretokenize import gpt2_regex


def replace_surrogates(text: str) -> str:
    """Pair up valid surrogate pairs and turn lone surrogates into U+FFFD (tiktoken's rule)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


NO_MERGE = 1 << 62  # larger than any id
PAIR_SHIFT = 32  # pair (a, b) -> the int key a << 32 | b: hashing one int is cheaper than a tuple


class ReferenceBPE:
    """Encode/decode with merge lists alone; `merges[i]` (bytes a, bytes b) is the i-th learned merge."""

    def __init__(self, ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], cache_size: int = 200_000):
        self.byte_ids = [ranks[bytes([b])] for b in range(256)]
        # When the single-byte ids are 0..255 (GPT-2's files, ours), bytes.translate maps a whole piece at once.
        self.byte_table = bytes(self.byte_ids) if sorted(self.byte_ids) == list(range(256)) else None
        # pair key -> id of the merged token. Merged ids increase along the merge list (checked when files
        # are read), so the smaller id is also the earlier merge: the id doubles as the priority.
        self.pair_to_id: dict[int, int] = {}
        for a, b in merges:
            self.pair_to_id[ranks[a] << PAIR_SHIFT | ranks[b]] = ranks[a + b]
        self.cache: dict[str, list[int]] = {}
        self.cache_size = cache_size
        self.pattern = gpt2_regex()

    def bpe(self, ids: list[int]) -> list[int]:
        """Apply the merges to one pre-tokenized piece given as base ids (the list is modified).

        `ranks[i]` is the merged id of the pair (ids[i], ids[i+1]), or NO_MERGE. Merging the leftmost
        pair of lowest rank, one at a time, is OpenAI's "merge every occurrence of the best pair" in a
        different order: a merge only creates pairs of higher rank, so the best pair stays best until
        all its occurrences are merged. Only the two neighbouring ranks change after a merge.
        """
        get = self.pair_to_id.get
        ranks = [get(ids[i] << PAIR_SHIFT | ids[i + 1], NO_MERGE) for i in range(len(ids) - 1)]
        while ranks:
            best = min(ranks)
            if best == NO_MERGE:
                break
            i = ranks.index(best)
            ids[i] = best
            del ids[i + 1], ranks[i]
            if i > 0:
                ranks[i - 1] = get(ids[i - 1] << PAIR_SHIFT | best, NO_MERGE)
            if i < len(ranks):
                ranks[i] = get(best << PAIR_SHIFT | ids[i + 1], NO_MERGE)
        return ids

    def encode_piece(self, piece: str) -> list[int]:
        ids = self.cache.get(piece)
        if ids is None:
            raw = piece.encode("utf-8")
            if self.byte_table is not None:
                ids = self.bpe(list(raw.translate(self.byte_table)))
            else:
                byte_ids = self.byte_ids
                ids = self.bpe([byte_ids[b] for b in raw])
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            self.cache[piece] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8 encoded; replace them with U+FFFD exactly as tiktoken does.
            return self._encode_ordinary(replace_surrogates(text))

    def _encode_ordinary(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for piece in self.pattern.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self.encode_piece(piece)
            out.extend(ids)
        return out
