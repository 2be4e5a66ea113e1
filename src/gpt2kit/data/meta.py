"""`meta.json`: what a shard directory holds, and the checks that it still matches its tokenizer.

A shard directory is `train.bin` / `val.bin` (flat little-endian token ids, every document followed by
one EOS token), `train.idx` / `val.idx` (little-endian uint64: the offset just past each document's EOS,
so document i is `bin[idx[i-1]:idx[i]-1]`), and `meta.json`:

    {"format": 1, "dtype": "uint16", "vocab_size": 50257, "eos_id": 50256,
     "tokenizer_fingerprint": "...", "tokenizer": "/abs/dir", "normalization": ..., "lowercase": false,
     "splits": {"train": {"documents", "tokens", "characters", "bytes"}, "val": {...}},
     "dedup": {...}, "val_fraction": 0.1, "seed": 0, "inputs": [...]}

`tokens` counts the EOS separators; `characters` and `bytes` (UTF-8) count the document text as stored
(after normalization), without the separators -- what bits-per-character and bits-per-byte divide by.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fileio import read_json

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_SPLIT_KEYS = ("documents", "tokens", "characters", "bytes")


def dtype_for_vocab(vocab_size: int) -> str:
    """The narrowest shard dtype that holds every id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate `data_dir/meta.json`; UserError when it is missing, corrupt or not ours."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory not found: {data_dir} (run `gpt2kit data prepare` first)")
    path = data_dir / "meta.json"
    if not path.exists():
        raise UserError(f"not a gpt2kit shard directory (no meta.json): {data_dir}")
    meta = read_json(path, "shard meta.json")
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT_VERSION})")
    if meta.get("dtype") not in DTYPES:
        raise UserError(f"{path}: field 'dtype' must be one of {sorted(DTYPES)}, got {meta.get('dtype')!r}")
    for key in ("vocab_size", "eos_id"):
        if not isinstance(meta.get(key), int):
            raise UserError(f"{path}: field {key!r} must be an integer")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        raise UserError(f"{path}: field 'splits' must hold 'train' and 'val'")
    for name in SPLITS:
        for key in _SPLIT_KEYS:
            if not isinstance(splits[name].get(key), int):
                raise UserError(f"{path}: splits.{name}.{key} must be an integer")
    return meta


def split_path(data_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return Path(data_dir) / f"{split}.bin"


def open_tokens(data_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None) -> np.ndarray:
    """A read-only memmap of a split's token ids (an empty array for an empty split).

    Checks the file size against meta.json so a truncated shard is an error, not silent garbage.
    """
    meta = read_meta(data_dir) if meta is None else meta
    path = split_path(data_dir, split)
    dtype = DTYPES[meta["dtype"]]
    expected = meta["splits"][split]["tokens"]
    if not path.exists():
        raise UserError(f"shard file missing: {path}")
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        raise UserError(
            f"shard file {path} has {size} bytes but meta.json says {expected} {meta['dtype']} tokens "
            f"({expected * dtype.itemsize} bytes): the directory is corrupt, prepare it again"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def document_ends(data_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None) -> np.ndarray:
    """Offsets just past each document's EOS in the split (uint64), from `<split>.idx` or a scan."""
    meta = read_meta(data_dir) if meta is None else meta
    n_docs = meta["splits"][split]["documents"]
    idx_path = Path(data_dir) / f"{split}.idx"
    if idx_path.exists() and idx_path.stat().st_size == 8 * n_docs:
        return np.fromfile(idx_path, dtype="<u8") if n_docs else np.zeros(0, dtype="<u8")
    tokens = open_tokens(data_dir, split, meta)  # no index: find the separators
    ends = (np.flatnonzero(tokens == meta["eos_id"]) + 1).astype("<u8")
    if len(ends) != n_docs:
        raise UserError(
            f"{split_path(data_dir, split)}: found {len(ends)} EOS separators but meta.json says {n_docs} documents"
        )
    return ends


def check_fingerprint(meta: dict[str, Any], tokenizer: Any) -> None:
    """UserError unless the shards were written by this exact tokenizer (merges, specials, pre-processing)."""
    want = meta.get("tokenizer_fingerprint")
    have = tokenizer.fingerprint
    if want != have:
        where = meta.get("tokenizer", "?")
        raise UserError(
            f"tokenizer fingerprint mismatch: shards were prepared with {str(want)[:16]} (tokenizer {where}) "
            f"but this tokenizer is {str(have)[:16]}; prepare the data again with this tokenizer"
        )
    if meta.get("vocab_size") is not None and meta["vocab_size"] != tokenizer.vocab_size:
        raise UserError(
            f"vocabulary size mismatch: shards have {meta['vocab_size']}, tokenizer has {tokenizer.vocab_size}"
        )
