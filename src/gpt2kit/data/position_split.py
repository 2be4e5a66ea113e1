"""Split by position, as nanoGPT does, for a corpus of too few documents to split by document.

The document split (`shards.SplitAssigner`) puts whole documents in val; one document (tinyshakespeare,
a single text file) would go entirely to one side. Here the documents are laid end to end in input
order, the first `1 - val_fraction` of the tokens go to train and the rest to val, and the cut is moved
forward to the next line boundary (a token whose text ends in a newline), or back to the previous one
when there is none after it. A document cut in two becomes one document on each side, each followed
by its EOS, so the shard layout is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20  # tokens decoded / copied at a time, so a huge single document stays out of memory


def needs_position_split(documents: int, val_fraction: float, val_documents: int, train_documents: int) -> bool:
    """True when a document split cannot honour `val_fraction`: fewer documents than one val document's
    worth, or one side left empty."""
    if val_fraction <= 0.0:
        return False
    return documents * val_fraction < 1.0 or val_documents == 0 or train_documents == 0


def _newline_table(tok: Any, vocab_size: int, eos_id: int) -> np.ndarray:
    table = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        try:
            table[i] = tok.decode_bytes([i]).endswith(b"\n")
        except Exception:  # ids the tokenizer does not define (holes in the vocabulary)
            pass
    table[eos_id] = True
    return table


def _cut_at_line(stream: np.ndarray, target: int, table: np.ndarray) -> int:
    """The position just past the first line-ending token at or after `target` (else before it)."""
    n = len(stream)
    for start in range(max(target - 1, 0), n, _CHUNK):
        hits = np.flatnonzero(table[stream[start : start + _CHUNK]])
        if len(hits):
            return start + int(hits[0]) + 1
    for end in range(max(target - 1, 0), 0, -_CHUNK):
        hits = np.flatnonzero(table[stream[max(end - _CHUNK, 0) : end]])
        if len(hits):
            return max(end - _CHUNK, 0) + int(hits[-1]) + 1
    return target


def _text_counts(tok: Any, ids: np.ndarray, eos_id: int) -> tuple[int, int]:
    """(characters, UTF-8 bytes) of the text of `ids`, separators excluded."""
    chars = nbytes = 0
    for start in range(0, len(ids), _CHUNK):
        part = ids[start : start + _CHUNK]
        raw = np.frombuffer(tok.decode_bytes(part[part != eos_id].tolist()), dtype=np.uint8)
        nbytes += len(raw)
        chars += int(np.count_nonzero((raw & 0xC0) != 0x80))  # one lead byte per character
    return chars, nbytes


def split_by_position(tmp: Path, tok: Any, dtype: np.dtype, documents: int, split_of: Callable[[int], str],
                      val_fraction: float) -> dict[str, dict[str, int]]:
    """Rewrite `tmp/{train,val}.{bin,idx}` split by position; returns the new per-split counts."""
    eos = int(tok.eos_id)
    bins = {s: np.fromfile(tmp / f"{s}.bin", dtype=dtype) for s in ("train", "val")}
    ends = {s: np.fromfile(tmp / f"{s}.idx", dtype="<u8").astype(np.int64) for s in ("train", "val")}
    # the documents back in input order (the document split interleaved them over the two files)
    pieces, doc_ends, pos, taken = [], [], 0, {"train": 0, "val": 0}
    for i in range(documents):
        s = split_of(i)
        k = taken[s]
        lo = int(ends[s][k - 1]) if k else 0
        hi = int(ends[s][k])
        pieces.append(bins[s][lo:hi])
        pos += hi - lo
        doc_ends.append(pos)
        taken[s] += 1
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    del bins, pieces
    doc_ends_arr = np.asarray(doc_ends, dtype=np.int64)
    target = int(round((1.0 - val_fraction) * len(stream)))
    cut = _cut_at_line(stream, target, _newline_table(tok, int(tok.vocab_size), eos)) if 0 < target else 0

    train = stream[:cut]
    train_ends = doc_ends_arr[doc_ends_arr <= cut]
    if cut and stream[cut - 1] != eos:  # the cut fell inside a document: close its first half
        train = np.concatenate([train, np.array([eos], dtype=dtype)])
        train_ends = np.append(train_ends, cut + 1)
    val = stream[cut:]
    val_ends = doc_ends_arr[doc_ends_arr > cut] - cut
    counts = {}
    for s, ids, e in (("train", train, train_ends), ("val", val, val_ends)):
        ids.astype(dtype, copy=False).tofile(tmp / f"{s}.bin")
        e.astype("<u8").tofile(tmp / f"{s}.idx")
        chars, nbytes = _text_counts(tok, ids, eos)
        counts[s] = {"documents": len(e), "tokens": len(ids), "characters": chars, "bytes": nbytes}
    return counts
