"""Train/eval contamination, GPT-3 style: which evaluation documents share an n-gram with the training data.

Text is compared as normalized words (lower-cased, NFKC, runs of Unicode word characters: punctuation
and whitespace dropped) and n-grams of `n` words (13 as in GPT-3). Memory is bounded by the *evaluation*
side: its n-grams are hashed into one sorted array; the training split is then streamed document by
document and only its n-grams made of words that occur in the evaluation set are hashed and looked up.
An evaluation document with fewer than `n` words cannot be checked and is counted as `too_short`.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import UserError
from .readers import Document, ReadOptions, iter_documents

_WORD = re.compile(r"\w+")
_UNKNOWN = np.uint64(0)  # word id for training words that never occur in the evaluation text
_MUL = np.uint64(0x9E3779B97F4A7C15)


def normalized_words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every n consecutive word ids, skipping windows that contain an unknown word."""
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    for j in range(n):
        h *= _MUL
        h += ids[j : j + count]
    unknown = np.concatenate([[0], np.cumsum(ids == _UNKNOWN)])
    ok = unknown[n:] - unknown[:-n] == 0
    return h[ok]


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set, by binary search (np.isin would re-sort the set on every call)."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def contamination_report(
    train_dir: str | os.PathLike,
    eval_inputs: Sequence[str] | Iterable[Document],
    n: int = 13,
    read: ReadOptions | None = None,
    tokenizer=None,
    top: int = 10,
) -> dict[str, Any]:
    """Share of evaluation documents with at least one n-gram that also occurs in `train_dir`'s train split."""
    from .meta import check_fingerprint, read_meta
    from .shards import iter_split_documents

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    meta = read_meta(train_dir)
    if tokenizer is None:
        from ..tokenizer import Tokenizer

        where = meta.get("tokenizer")
        if not where or not os.path.isdir(where):
            raise UserError(f"the tokenizer recorded in {train_dir}/meta.json ({where}) is gone: pass --tokenizer DIR")
        tokenizer = Tokenizer.from_pretrained(where)
    check_fingerprint(meta, tokenizer)

    if isinstance(eval_inputs, Sequence) and all(isinstance(x, (str, os.PathLike)) for x in eval_inputs):
        eval_docs = list(iter_documents([str(x) for x in eval_inputs], read or ReadOptions()))
    else:
        eval_docs = list(eval_inputs)
    if not eval_docs:
        raise UserError("the evaluation input holds no documents")

    vocab: dict[str, int] = {}
    per_doc: list[np.ndarray] = []
    words_of: list[list[str]] = []
    for d in eval_docs:
        words = normalized_words(d.text)
        ids = np.array([vocab.setdefault(w, len(vocab) + 1) for w in words], dtype=np.uint64)
        per_doc.append(_ngram_hashes(ids, n))
        words_of.append(words)
    eval_set = np.unique(np.concatenate(per_doc)) if per_doc else np.zeros(0, np.uint64)

    found = np.zeros(len(eval_set), dtype=bool)  # eval n-grams seen in training
    train_docs = 0
    for text in iter_split_documents(train_dir, "train", tokenizer):
        train_docs += 1
        ids = np.array([vocab.get(w, 0) for w in normalized_words(text)], dtype=np.uint64)
        h = _ngram_hashes(ids, n)
        if len(h) and len(eval_set):
            pos = np.minimum(np.searchsorted(eval_set, h), len(eval_set) - 1)
            found[pos[eval_set[pos] == h]] = True
    matched = eval_set[found]  # sorted, like eval_set

    rows = []
    for d, hashes, words in zip(eval_docs, per_doc, words_of):
        if len(words) < n:
            continue
        hit = _member(hashes, matched)
        rows.append({"source": d.source, "ngrams": int(len(hashes)), "matched": int(hit.sum()),
                     "share": float(hit.mean()) if len(hashes) else 0.0,
                     "example": " ".join(words[int(np.argmax(hit)) : int(np.argmax(hit)) + n]) if hit.any() else ""})
    contaminated = [r for r in rows if r["matched"] > 0]
    contaminated.sort(key=lambda r: (-r["share"], -r["matched"], r["source"]))
    return {
        "n": n,
        "train": str(train_dir),
        "train_documents": train_docs,
        "eval_documents": len(eval_docs),
        "checked": len(rows),
        "too_short": len(eval_docs) - len(rows),
        "contaminated": len(contaminated),
        "share_contaminated": len(contaminated) / len(rows) if rows else 0.0,
        "worst": contaminated[:top],
    }
