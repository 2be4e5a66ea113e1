"""Exact and near-duplicate document removal.

Exact: a 128-bit BLAKE2b digest of the normalized document's UTF-8 bytes; the first occurrence stays.

Near: MinHash over the set of token n-gram shingles (default 4 consecutive token ids of the normalized
document), indexed by LSH banding (`BandIndex`: datasketch's MinHashLSH scheme and parameter choice,
re-implemented on numpy + dicts because datasketch's import alone (scipy) costs a second and its
per-document overhead was a tenth of the tokenizer's time; tests check both give the same candidates).
A candidate is confirmed only when the estimated Jaccard similarity (share of equal signature slots)
reaches the threshold, so a band collision alone never removes a document. The first document stays.

The signature is one-permutation MinHash (Li, Owen & Zhang 2012) with optimal densification
(Shrivastava 2017): each shingle is hashed once to 64 bits, its top bits pick one of `num_perm` bins and
its low 32 bits compete for that bin's minimum; an empty bin borrows from the first non-empty bin along
its own seeded random probe sequence. Collision probability per slot equals the Jaccard similarity, as for classic MinHash, but the cost is O(shingles)
instead of O(shingles x num_perm) -- which is what lets dedup run at tokenizer speed. It is computed in
the tokenizer worker processes (`minhash_bins`, and `densify` for whole documents); documents that
arrive in parts merge their bins with `np.minimum` and are densified in the main process.

Memory: the exact index holds ~100 bytes per kept document; the near index ~1 KB (band tables) plus
512 bytes (the signature, kept for confirmation) per kept document: ~1.6 GB for 1M documents.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EMPTY = np.uint32(0xFFFFFFFF)  # bin value meaning "no shingle fell here" (a real 0xFFFFFFFF reads as empty: p=2**-32)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PROBES = 1024  # probe sequence length for empty bins
_FIRST_PROBES = 8


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every input bit affects every output bit.
    (One scratch buffer instead of a fresh temporary per shift: fewer page faults on big documents.)"""
    tmp = np.empty_like(h)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
        np.right_shift(h, np.uint64(shift), out=tmp)
        np.bitwise_xor(h, tmp, out=h)
        if mult is not None:
            np.multiply(h, np.uint64(mult), out=h)
    return h


def shingle_hashes(ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """64-bit hashes of every run of `n` consecutive ids (one hash of all ids if there are fewer).

    uint16 ids with n == 4 (GPT-2-sized vocabularies, the default) take a fast path: each 4-gram *is*
    8 bytes, read in place through a strided uint64 view and only mixed -- half the work of the general
    polynomial hash, which every other dtype / n uses.
    """
    ids = np.asarray(ids)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, len(ids))
    count = len(ids) - n + 1
    salt = np.uint64(seed) * _GOLDEN + np.uint64(n)
    if n == 4 and ids.dtype == np.uint16:
        ids = np.ascontiguousarray(ids)
        windows = np.ndarray((count,), dtype="<u8", buffer=ids.data, strides=(2,))
        return _mix64(windows ^ salt)
    ids = ids.astype(np.uint64)
    h = np.full(count, salt, dtype=np.uint64)
    for j in range(n):  # a polynomial hash: h = h * G + id, mixed at the end
        h *= _GOLDEN
        h += ids[j : j + count]
    return _mix64(h)


def minhash_bins(ids: np.ndarray, num_perm: int = 128, shingle: int = 4, seed: int = 0) -> np.ndarray:
    """One-permutation MinHash bins of the shingles of `ids` (uint32; EMPTY where no shingle landed).

    A shingle's bin is the top log2(num_perm) bits of its hash, its value the low 32 bits -- both read
    through little-endian views of the hash array rather than computed with extra passes over it.
    """
    if num_perm & (num_perm - 1) or not 2 <= num_perm <= 1 << 8:
        raise ValueError(f"num_perm must be a power of two in [2, 256], got {num_perm}")
    bins = np.full(num_perm, EMPTY, dtype=np.uint32)
    h = shingle_hashes(ids, shingle, seed)
    shift = num_perm.bit_length() - 1
    if len(h) and sys.byteorder == "little":
        which = h.view(np.uint8)[7::8] >> np.uint8(8 - shift)  # bits 56..63, shifted to the top `shift`
        np.minimum.at(bins, which, h.view(np.uint32)[::2])  # bits 0..31
    elif len(h):
        which = (h >> np.uint64(64 - shift)).astype(np.intp)
        np.minimum.at(bins, which, (h & np.uint64(0xFFFFFFFF)).astype(np.uint32))
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
    bins = np.asarray(bins, dtype=np.uint32)
    filled = bins != EMPTY
    if filled.all():
        return bins.copy()
    nonempty = np.flatnonzero(filled)
    if len(nonempty) == 0:
        return np.zeros(len(bins), dtype=np.uint32)
    empty = np.flatnonzero(~filled)
    table = _probe_table(len(bins), seed)
    probes = table[empty, :_FIRST_PROBES]  # most empty bins find a filled one within a few probes
    hits = filled[probes]
    src = probes[np.arange(len(empty)), hits.argmax(axis=1)]
    slow = np.flatnonzero(~hits.any(axis=1))
    if len(slow):  # sparse documents: follow the long probe sequences of the rest
        probes = table[empty[slow]]
        hits = filled[probes]
        src[slow] = probes[np.arange(len(slow)), hits.argmax(axis=1)]
        src[slow[~hits.any(axis=1)]] = nonempty[0]  # no hit in _PROBES tries (p < 3e-4 with one full bin)
    out = bins.copy()
    out[empty] = bins[src]
    return out


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) minimizing the weighted false-positive + false-negative probability mass
    around `threshold` -- the objective of datasketch's MinHashLSH, integrated with numpy instead of scipy."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]

    def trapezoid(lo: float, hi: float, candidate: bool) -> np.ndarray:
        s = np.linspace(lo, hi, 129)[None, :]  # enough: same choice as datasketch for 0.30..0.98
        p = 1 - (1 - s**r) ** b  # probability that a pair of similarity s becomes a candidate
        y = p if candidate else 1 - p
        return ((y[:, 1:] + y[:, :-1]) * np.diff(s)).sum(axis=1) / 2

    err = fp_weight * trapezoid(0.0, threshold, True) + fn_weight * trapezoid(threshold, 1.0, False)
    best = int(np.argmin(err))
    return int(pairs[best, 0]), int(pairs[best, 1])


class BandIndex:
    """MinHash LSH: a signature is cut into `bands` bands of `rows` slots; documents whose signatures agree
    on every slot of at least one band are candidates. The same banding as datasketch's MinHashLSH (tests
    check both return the same candidates), and like datasketch each band's raw bytes are the dict key:
    slicing one `tobytes()` costs ~2 us a document, where hashing the bands with numpy cost ~50 us (small
    arrays are all call overhead). Memory ~1 KB per document."""

    def __init__(self, bands: int, rows: int):
        self.bands, self.rows = bands, rows
        self._tables: list[dict[bytes, int | list[int]]] = [{} for _ in range(bands)]

    def keys(self, signature: np.ndarray) -> list[bytes]:
        raw = np.ascontiguousarray(signature, dtype=np.uint32).tobytes()
        width = 4 * self.rows
        return [raw[i * width : (i + 1) * width] for i in range(self.bands)]

    def query(self, keys: list[bytes]) -> set[int]:
        found: set[int] = set()
        for table, k in zip(self._tables, keys):
            hit = table.get(k)
            if hit is not None:
                found.update(hit) if isinstance(hit, list) else found.add(hit)
        return found

    def insert(self, doc_id: int, keys: list[bytes]) -> None:
        for table, k in zip(self._tables, keys):
            hit = table.get(k)
            if hit is None:
                table[k] = doc_id
            elif isinstance(hit, list):
                hit.append(doc_id)
            else:
                table[k] = [hit, doc_id]


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
    shingle: int = 4
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
            self._lsh = BandIndex(*optimal_bands(self.threshold, self.num_perm))

    def check(self, digest: bytes, signature: np.ndarray | None, source: str) -> Removal | None:
        """None if the document is new (it is then indexed), else why it is removed."""
        if self.exact:
            first = self._digests.get(digest)
            if first is not None:
                self.exact_removed += 1
                return Removal("exact", source, self._sources[first], 1.0)
        if self.near and signature is not None:
            keys = self._lsh.keys(signature)
            best, best_j = -1, 0.0
            for cand in self._lsh.query(keys):
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
            self._lsh.insert(doc_id, keys)
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
            "(optimal densification) over token n-grams, LSH banding, confirmed by estimated Jaccard >= threshold",
            "bands": self._lsh.bands if self._lsh else None,
            "rows": self._lsh.rows if self._lsh else None,
        }
