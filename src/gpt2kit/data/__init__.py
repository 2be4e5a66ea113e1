"""Corpora to token shards, and batches back out of them.

- `readers`: documents from text files, folders, globs, JSONL, Parquet, stdin; `default_corpus()`.
- `dedup`: exact and near-duplicate (MinHash LSH) removal.
- `shards`: `prepare(...)`, the streaming, parallel writer of `train.bin` / `val.bin` / `meta.json`.
- `meta`: `read_meta`, `check_fingerprint`, the shard format.
- `loader`: `ShardLoader`, `Batch`, `iter_eval_batches`, sequence-length samplers.
- `contamination`: n-gram overlap between training shards and evaluation text.

Names are re-exported lazily so `import gpt2kit.data` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

_EXPORTS = {
    "read_meta": "meta",
    "check_fingerprint": "meta",
    "open_tokens": "meta",
    "document_ends": "meta",
    "Document": "readers",
    "iter_documents": "readers",
    "default_corpus": "readers",
    "default_corpus_files": "readers",
    "Deduplicator": "dedup",
    "prepare": "shards",
    "PrepareResult": "shards",
    "iter_split_documents": "shards",
    "ShardLoader": "loader",
    "Batch": "loader",
    "iter_eval_batches": "loader",
    "UniformLengths": "loader",
    "ScheduledLengths": "loader",
    "parse_seq_len_sampler": "loader",
    "contamination_report": "contamination",
}

__all__ = [
    "Batch",
    "Deduplicator",
    "Document",
    "PrepareResult",
    "ScheduledLengths",
    "ShardLoader",
    "UniformLengths",
    "check_fingerprint",
    "contamination_report",
    "default_corpus",
    "default_corpus_files",
    "document_ends",
    "iter_documents",
    "iter_eval_batches",
    "iter_split_documents",
    "open_tokens",
    "parse_seq_len_sampler",
    "prepare",
    "read_meta",
]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover
    from .contamination import contamination_report
    from .dedup import Deduplicator
    from .loader import (
        Batch,
        ScheduledLengths,
        ShardLoader,
        UniformLengths,
        iter_eval_batches,
        parse_seq_len_sampler,
    )
    from .meta import check_fingerprint, document_ends, open_tokens, read_meta
    from .readers import Document, default_corpus, default_corpus_files, iter_documents
    from .shards import PrepareResult, iter_split_documents, prepare
