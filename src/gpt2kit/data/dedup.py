"""Exact and near-duplicate document removal.

Exact: a 128-bit BLAKE2b digest of the normalized document's UTF-8 bytes; the first occurrence stays.

Near: MinHash over the set of token n-gram shingles (default 5 consecutive token ids of the normalized
document), indexed with `datasketch.MinHashLSH`; a candidate the index returns is confirmed only when
the estimated Jaccard similarity (share of equal signature slots) reaches the threshold, so an LSH band
collision alone never removes a document. Again the first document stays and later ones go.

The signature is one-permutation MinHash (Li, Owen & Zhang 2012) with optimal densification
(Shrivastava 2017): each shingle is hashed once to 64 bits, its top bits pick one of `num_perm` bins and
its low 32 bits compete for that bin's minimum; an empty bin borrows from the first non-empty bin along
its own seeded random probe sequence. Collision
probability per slot equals the Jaccard similarity, as for classic MinHash, but the cost is O(shingles)
instead of O(shingles x num_perm) -- which is what lets dedup run at tokenizer speed. It is computed in
the tokenizer worker processes (`minhash_bins`), merged for documents that arrive in parts
(`np.minimum`), and finished in the main process (`densify`).

Memory: the exact index holds ~100 bytes per kept document; the near index (datasketch's in-memory
LSH plus a 4-byte-per-slot signature copy for confirmation) ~2-3 KB per kept document.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EMPTY = np.uint64(1 << 32)  # bin value meaning "no shingle fell here" (real values are < 2**32)
_MASK32 = np.uint64(0xFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PROBES = 1024  # probe sequence length for empty bins


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every input bit affects every output bit."""
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def shingle_hashes(ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """64-bit hashes of every run of `n` consecutive ids (one hash of all ids if there are fewer)."""
    ids = np.asarray(ids, dtype=np.uint64)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, len(ids))
    count = len(ids) - n + 1
    h = np.full(count, np.uint64(seed) * _GOLDEN + np.uint64(n), dtype=np.uint64)
    for j in range(n):  # a polynomial hash: h = h * G + id, mixed at the end
        h *= _GOLDEN
        h += ids[j : j + count]
    return _mix64(h)


def minhash_bins(ids: np.ndarray, num_perm: int = 128, shingle: int = 5, seed: int = 0) -> np.ndarray:
    """One-permutation MinHash bins of the shingles of `ids` (uint64; EMPTY where no shingle landed)."""
    if num_perm & (num_perm - 1) or not 2 <= num_perm <= 1 << 16:
        raise ValueError(f"num_perm must be a power of two in [2, 65536], got {num_perm}")
    bins = np.full(num_perm, EMPTY, dtype=np.uint64)
    h = shingle_hashes(ids, shingle, seed)
    if len(h):
        which = (h >> np.uint64(64 - (num_perm.bit_length() - 1))).astype(np.intp)  # top log2(K) bits
        np.minimum.at(bins, which, h & _MASK32)
    return bins


@functools.lru_cache(maxsize=8)
def _probe_table(num_perm: int, seed: int) -> np.ndarray:
    """For each bin, a fixed random sequence of bins to borrow from when it is empty."""
    rng = np.random.default_rng([seed, num_perm, 0xD3])
    return rng.integers(0, num_perm, size=(num_perm, _PROBES), dtype=np.int32)


def densify(bins: np.ndarray, seed: int = 0) -> np.ndarray:
    """The uint32 signature from one-permutation bins: an empty bin takes the value of the first
    non-empty bin along its own fixed random probe sequence ("optimal densification", Shrivastava
    2017), which keeps Pr[slot equal] = Jaccard even for short documents. All-empty -> zeros."""
    bins = np.asarray(bins, dtype=np.uint64)
    filled = bins != EMPTY
    if filled.all():
        return bins.astype(np.uint32)
    nonempty = np.flatnonzero(filled)
    if len(nonempty) == 0:
        return np.zeros(len(bins), dtype=np.uint32)
    empty = np.flatnonzero(~filled)
    probes = _probe_table(len(bins), seed)[empty]  # [E, _PROBES]
    hits = filled[probes]
    first = hits.argmax(axis=1)
    src = probes[np.arange(len(empty)), first]
    src[~hits.any(axis=1)] = nonempty[0]  # no hit in _PROBES tries (p < 3e-4 even with one full bin)
    out = bins.copy()
    out[empty] = bins[src]
    return out.astype(np.uint32)


def _band_key(band: bytes) -> bytes:
    """Compact LSH bucket key (8 bytes instead of r*8 bytes of raw hash values)."""
    return hashlib.blake2b(band, digest_size=8).digest()


class _Sketch:
    """What `MinHashLSH` reads from a MinHash: `hashvalues` and `len()`. (Our signatures come from
    one-permutation hashing, not from datasketch's permutation schemes, so no `scheme` is claimed.)"""

    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


@dataclass
class Removal:
    kind: str  # "exact" | "near"
    source: str  # the removed document
    duplicate_of: str  # the earlier document it duplicates
    jaccard: float  # 1.0 for exact duplicates; the MinHash estimate for near ones

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "duplicate_of": self.duplicate_of,
                "jaccard": round(self.jaccard, 4)}


@dataclass
class Deduplicator:
    """Decides, document by document in input order, whether to keep it (see the module doc)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    seed: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    _digests: dict[bytes, int] = field(default_factory=dict, repr=False)
    _sources: list[str] = field(default_factory=list, repr=False)
    _signatures: list[np.ndarray] = field(default_factory=list, repr=False)
    _lsh: Any = field(default=None, repr=False)

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            from ..errors import UserError

            raise UserError(f"--near-dup-threshold must be in (0, 1], got {self.threshold}")
        if self.near:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, hashfunc=_band_key)

    def check(self, digest: bytes, signature: np.ndarray | None, source: str) -> Removal | None:
        """None if the document is new (it is then indexed), else why it is removed."""
        if self.exact:
            first = self._digests.get(digest)
            if first is not None:
                self.exact_removed += 1
                return Removal("exact", source, self._sources[first], 1.0)
        if self.near and signature is not None:
            sketch = _Sketch(signature)
            best, best_j = -1, 0.0
            for cand in self._lsh.query(sketch):
                j = float(np.mean(self._signatures[cand] == signature))
                if j >= self.threshold and (j > best_j or (j == best_j and cand < best)):
                    best, best_j = cand, j
            if best >= 0:
                self.near_removed += 1
                return Removal("near", source, self._sources[best], best_j)
        doc_id = len(self._sources)
        self._sources.append(source)
        if self.exact:
            self._digests[digest] = doc_id
        if self.near and signature is not None:
            self._signatures.append(signature)
            self._lsh.insert(doc_id, sketch, check_duplication=False)
        else:
            self._signatures.append(np.zeros(0, dtype=np.uint32))
        return None

    def summary(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "near": self.near,
            "exact_removed": self.exact_removed,
            "near_removed": self.near_removed,
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "shingle_tokens": self.shingle,
            "method": "exact: blake2b-128 of the normalized text; near: one-permutation MinHash "
            "(rotation densification) over token n-grams, datasketch MinHashLSH, confirmed by "
            "estimated Jaccard >= threshold",
        }
