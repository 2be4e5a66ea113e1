"""`prepare`: documents -> normalized, de-duplicated, tokenized `train.bin` / `val.bin` + `meta.json`.

The pipeline streams: the main process reads pieces of documents (`readers`) and hands batches of them
to worker processes (a `ProcessPoolExecutor`), which normalize, tokenize, hash (exact dedup) and sketch
(MinHash bins) them. A file that is one whole document is not read by the main process at all: it goes
as a `FilePiece` (its name) and the worker reads it, so the text never crosses a pipe. The
main process takes the results back in input order, decides per document (duplicate? train or val?)
and appends the ids, followed by one EOS, to the split's file. At most `max_inflight_chars` of text is
in flight at once, so memory stays bounded whatever the corpus size. Everything is written into a
temporary sibling of the output directory that is renamed into place only when complete.

Stream layout: `doc_0 EOS doc_1 EOS ... doc_n EOS` -- every document is *followed* by EOS and the stream
does not start with one, so `decode(train.bin)` equals `"".join(d + "<|endoftext|>" for d in docs)`.

Split: documents (after dedup, in input order) are assigned by systematic sampling with a random
member per stratum: the stream is cut into consecutive blocks of about 1/val_fraction documents and one
document of each block, chosen from `seed`, goes to val. That is deterministic, streaming, and gives
val exactly round(val_fraction * n) documents (+-1) spread evenly over the corpus. A corpus of too few
documents for that (one text file, say) is split by position instead, as nanoGPT does
(`position_split`); an empty train split is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_dir, atomic_write_json
from .dedup import Deduplicator, densify, minhash_bins
from .meta import DTYPES, FORMAT_VERSION, SPLITS, dtype_for_vocab, read_meta
from .position_split import needs_position_split, split_by_position
from .readers import (
    DEFAULT_CORPUS_NAME,
    FilePiece,
    Piece,
    ReadOptions,
    ReadStats,
    _default_corpus_paths,
    default_corpus_pieces,
    iter_pieces,
    join_pieces,
    resolve_inputs,
)

_TASK_CHARS = 256 << 10  # text per worker task: small enough to keep both workers and the writer busy
_SPILL_BYTES = 64 << 20  # a document's ids above this go to a temporary file until it is complete


# --- the split ----------------------------------------------------------------------------------------
class SplitAssigner:
    """Document i -> "train" | "val" (see the module doc); O(1) memory."""

    def __init__(self, val_fraction: float, seed: int):
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        self.f = float(val_fraction)
        self.seed = int(seed)
        self.u = self._uniform(-1)  # phase of the block grid
        self._block: tuple[int, int] | None = None  # (block id, chosen document)

    def _uniform(self, j: int) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{j}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    def _block_of(self, i: int) -> int:
        return math.floor(self.f * i + self.u)

    def _start(self, j: int) -> int:
        c = max(0, math.ceil((j - self.u) / self.f))
        while c > 0 and self._block_of(c - 1) >= j:
            c -= 1
        while self._block_of(c) < j:
            c += 1
        return c

    def split(self, i: int) -> str:
        if self.f == 0.0:
            return "train"
        j = self._block_of(i)
        if self._block is None or self._block[0] != j:
            start, end = self._start(j), self._start(j + 1)
            self._block = (j, start + int(self._uniform(j) * (end - start)))
        return "val" if i == self._block[1] else "train"


# --- worker side ----------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str | None, dtype: str, sketch: dict | None) -> None:
    tok = _WORKER.get("tokenizer")
    if tok is None or _WORKER.get("tokenizer_dir") != tokenizer_dir:
        from ..tokenizer import Tokenizer

        if tokenizer_dir is None:
            raise RuntimeError("worker has no tokenizer")
        tok = Tokenizer.from_pretrained(tokenizer_dir)
    _WORKER.update(tokenizer=tok, tokenizer_dir=tokenizer_dir, dtype=DTYPES[dtype], sketch=sketch,
                   encode=_encoder(tok))


def _encoder(tok):
    """The fastest way to ids of already-normalized text: tiktoken straight into a numpy buffer."""
    enc = getattr(tok, "tiktoken_encoding", None) if getattr(tok, "engine", "tiktoken") == "tiktoken" else None
    if enc is not None and hasattr(enc, "encode_to_numpy"):
        return lambda text: enc.encode_to_numpy(text, disallowed_special=())  # specials as plain text
    return lambda text: np.asarray(tok.encode_ordinary(text), dtype=np.uint32)


@dataclass
class EncodedPiece:
    ids: np.ndarray  # shard dtype
    characters: int
    bytes: int
    digest: bytes  # BLAKE2b of the normalized piece
    bins: np.ndarray | None  # MinHash bins (multi-part documents) ...
    signature: np.ndarray | None  # ... or the finished signature (whole documents)


def _encode_task(texts: list[tuple[str | FilePiece, bool]]) -> list[EncodedPiece]:
    tok, dtype, sketch = _WORKER["tokenizer"], _WORKER["dtype"], _WORKER["sketch"]
    encode = _WORKER["encode"]
    out = []
    for text, whole in texts:
        if isinstance(text, FilePiece):  # read here, in parallel, instead of in the main process
            text = text.read()
        text = tok.normalize(text)
        raw = text.encode("utf-8", "surrogatepass")
        ids = encode(text).astype(dtype, copy=False)  # ids < vocab_size, which the dtype was chosen to hold
        bins = sig = None
        if sketch is not None:
            bins = minhash_bins(ids, **sketch)
            if whole:
                sig, bins = densify(bins, sketch["seed"]), None
        out.append(
            EncodedPiece(ids, len(text), len(raw),
                         hashlib.blake2b(raw, digest_size=16).digest(), bins, sig)
        )
    return out


# --- main side ----------------------------------------------------------------------------------------
@dataclass
class SplitCounts:
    documents: int = 0
    tokens: int = 0
    characters: int = 0
    bytes: int = 0


@dataclass
class PrepareResult:
    out_dir: Path
    meta: dict[str, Any]
    seconds: float
    input_bytes: int  # UTF-8 bytes of the normalized text that went through the tokenizer

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


@dataclass
class _PendingDoc:
    source: str = ""
    parts: list[np.ndarray] = field(default_factory=list)
    part_bytes: int = 0
    spill: Any = None  # open temporary file once the document's ids outgrow memory
    characters: int = 0
    bytes: int = 0
    digests: list[bytes] = field(default_factory=list)
    bins: np.ndarray | None = None
    signature: np.ndarray | None = None


class _ShardWriter:
    """Appends documents to train/val files, keeps the counts and the document index."""

    def __init__(self, tmp: Path, eos_id: int, dtype: np.dtype):
        self.files = {s: open(tmp / f"{s}.bin", "wb", buffering=1 << 20) for s in SPLITS}  # noqa: SIM115
        self.index = {s: open(tmp / f"{s}.idx", "wb", buffering=1 << 16) for s in SPLITS}  # noqa: SIM115
        self.counts = {s: SplitCounts() for s in SPLITS}
        self.eos = np.array([eos_id], dtype=dtype).tobytes()
        self.itemsize = dtype.itemsize

    def write(self, split: str, doc: _PendingDoc) -> None:
        f, c = self.files[split], self.counts[split]
        n = 0
        if doc.spill is not None:
            doc.spill.seek(0)
            shutil.copyfileobj(doc.spill, f, 1 << 20)
            n += doc.spill.tell() // self.itemsize
        for part in doc.parts:
            f.write(part.tobytes())
            n += len(part)
        f.write(self.eos)
        c.documents += 1
        c.tokens += n + 1
        c.characters += doc.characters
        c.bytes += doc.bytes
        self.index[split].write(np.uint64(c.tokens).tobytes())

    def close(self) -> None:
        for f in (*self.files.values(), *self.index.values()):
            f.close()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Shut the workers down now, also mid-task (an error or Ctrl-C in the main process must not wait
    for the queued work)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # Python < 3.14: no terminate_workers()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join()


def _batched_tasks(pieces: Iterable[Piece | FilePiece]) -> Iterator[tuple[list, list[Piece | FilePiece], int]]:
    """Group pieces into worker tasks of about _TASK_CHARS characters: ([(text or FilePiece, whole
    document?)], the pieces for context, characters). A FilePiece counts as its size in bytes."""
    batch: list[Piece | FilePiece] = []
    size = 0
    first_of_doc = True
    texts: list[tuple[str | FilePiece, bool]] = []
    for p in pieces:
        batch.append(p)
        deferred = isinstance(p, FilePiece)
        texts.append((p if deferred else p.text, first_of_doc and p.last))  # whole: sketch finished in the worker
        first_of_doc = p.last
        size += p.size if deferred else len(p.text)
        if size >= _TASK_CHARS:
            yield texts, batch, size
            batch, texts, size = [], [], 0
    if batch:
        yield texts, batch, size


def _load_tokenizer(tokenizer):
    from ..tokenizer import Tokenizer

    if tokenizer is None:
        raise UserError("no tokenizer: pass --tokenizer DIR (e.g. GPT-2's encoder.json + vocab.bpe folder) "
                        "or --train-tokenizer --vocab-size N")
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_pretrained(tokenizer), str(Path(tokenizer).resolve())
    return tokenizer, None


def prepare(
    inputs: Sequence[str] | None,
    tokenizer: str | os.PathLike | Any,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 2,
    read: ReadOptions | None = None,
    dedup: bool = True,
    near_dup: bool = True,
    near_dup_threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    train_tokenizer_vocab: int | None = None,
    train_tokenizer_kwargs: dict | None = None,
    max_inflight_chars: int = 64 << 20,
    log=None,
) -> PrepareResult:
    """Write the shard directory `out_dir` (see the module doc). `inputs=None` = the default corpus.

    `tokenizer` is a tokenizer directory (re-opened in every worker) or a `Tokenizer` (workers then
    inherit it by fork). With `train_tokenizer_vocab`, a tokenizer is first trained on the inputs and
    saved to `out_dir/tokenizer/`, and `tokenizer` is ignored.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    read = read or ReadOptions()
    splitter = SplitAssigner(val_fraction, seed)
    files = resolve_inputs(inputs) if inputs is not None else None  # fail fast on missing inputs
    if not 0.0 < near_dup_threshold <= 1.0:
        raise UserError(f"--near-dup-threshold must be in (0, 1], got {near_dup_threshold}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if train_tokenizer_vocab is not None and files is not None and any(f.path == "-" for f in files):
        raise UserError("--train-tokenizer reads the inputs twice, so it cannot take stdin (-): pass files")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()

    def pieces(stats: ReadStats, defer: bool) -> Iterator[Piece | FilePiece]:
        """The inputs; with `defer`, whole-file documents come unread (the workers read them)."""
        if files is None:
            return default_corpus_pieces(defer_files=defer)
        return iter_pieces(files, read, stats, defer_whole_files=defer)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if train_tokenizer_vocab is not None:
            from ..tokenizer import Tokenizer

            log(f"training a {train_tokenizer_vocab}-token BPE tokenizer on the inputs ...")
            texts = (d.text for d in join_pieces(pieces(ReadStats(), defer=False)))
            tok = Tokenizer.train(texts, train_tokenizer_vocab, progress=progress, **(train_tokenizer_kwargs or {}))
            tok.save(tmp / "tokenizer")
            tok_dir, tok_final = str(tmp / "tokenizer"), str(out_dir.resolve() / "tokenizer")
        else:
            tok, tok_dir = _load_tokenizer(tokenizer)
            tok_final = tok_dir
        meta = _write_shards(
            tmp, pieces, tok, tok_dir, splitter, workers, dedup, near_dup, near_dup_threshold, num_perm, shingle,
            seed, progress, max_inflight_chars, log, read, files,
        )
        meta["tokenizer"] = tok_final
        meta["inputs"] = [f"<default corpus: {DEFAULT_CORPUS_NAME}>"] if inputs is None else list(inputs)
        atomic_write_json(tmp / "meta.json", meta)
    seconds = time.perf_counter() - t0
    total_bytes = sum(meta["splits"][s]["bytes"] for s in SPLITS) + meta["dedup"]["removed_bytes"]
    return PrepareResult(out_dir, read_meta(out_dir), seconds, total_bytes)


def _total_input_bytes(files) -> int | None:
    """Progress-bar total: sum of file sizes when that equals the text size (no stdin, no compression)."""
    if files is None:
        return sum(os.path.getsize(p) for p in _default_corpus_paths())
    total = 0
    for f in files:
        if f.path == "-" or f.path.endswith((".gz", ".bz2", ".xz", ".parquet")):
            return None
        total += os.path.getsize(f.path)
    return total


class _NoBar:
    """Stands in for the progress bar under --quiet (and spares tqdm's import, ~50 ms)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(files):
    from tqdm import tqdm

    return tqdm(total=_total_input_bytes(files), unit="B", unit_scale=True, unit_divisor=1000, desc="prepare",
                file=sys.stderr, dynamic_ncols=True)


def _write_shards(tmp, pieces_fn, tok, tok_dir, splitter, workers, dedup, near_dup, threshold, num_perm,
                  shingle, seed, progress, max_inflight_chars, log, read, files) -> dict[str, Any]:
    dtype_name = dtype_for_vocab(tok.vocab_size)
    dtype = DTYPES[dtype_name]
    sketch = {"num_perm": num_perm, "shingle": shingle, "seed": seed} if dedup and near_dup else None
    deduper = Deduplicator(exact=dedup, near=dedup and near_dup, threshold=threshold, num_perm=num_perm,
                           shingle=shingle, seed=seed)
    writer = _ShardWriter(tmp, tok.eos_id, dtype)
    report = open(tmp / "dedup.jsonl", "w", encoding="utf-8")  # noqa: SIM115
    stats = ReadStats()
    removed_bytes = 0
    kept = 0

    # workers: fork inherits the loaded tokenizer; spawn re-opens it from its directory
    pool = None
    _WORKER.update(tokenizer=tok, tokenizer_dir=tok_dir)
    if workers > 1:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        if ctx.get_start_method() != "fork" and tok_dir is None:
            raise UserError("parallel prepare on this platform needs a tokenizer directory, not an object")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(tok_dir, dtype_name, sketch))
    else:
        _init_worker(tok_dir, dtype_name, sketch)

    bar = _progress_bar(files) if progress else _NoBar()
    doc = _PendingDoc()
    try:
        inflight: deque = deque()
        inflight_chars = 0
        tasks = _batched_tasks(pieces_fn(stats, True))
        exhausted = False
        fingerprint = None
        while True:
            while not exhausted and (not inflight or inflight_chars < max_inflight_chars):
                nxt = next(tasks, None)
                if nxt is None:
                    exhausted = True
                    break
                texts, batch, chars = nxt
                res = pool.submit(_encode_task, texts) if pool else _encode_task(texts)
                inflight.append((res, batch, chars))
                inflight_chars += chars
            if not inflight:
                break
            if fingerprint is None:  # ~0.5 s for GPT-2: compute it while the workers are busy, not after
                fingerprint = tok.fingerprint
            res, batch, chars = inflight.popleft()
            inflight_chars -= chars
            encoded = res.result() if pool else res
            for piece, enc in zip(batch, encoded):
                bar.update(enc.bytes)
                doc.source = piece.source
                doc.characters += enc.characters
                doc.bytes += enc.bytes
                doc.digests.append(enc.digest)
                doc.signature = enc.signature
                if enc.bins is not None:
                    doc.bins = enc.bins if doc.bins is None else np.minimum(doc.bins, enc.bins)
                doc.parts.append(enc.ids)
                doc.part_bytes += enc.ids.nbytes
                if doc.part_bytes > _SPILL_BYTES:
                    if doc.spill is None:
                        doc.spill = open(tmp / ".spill", "w+b")  # noqa: SIM115
                    for part in doc.parts:
                        doc.spill.write(part.tobytes())
                    doc.parts, doc.part_bytes = [], 0
                if not piece.last:
                    continue
                digest = doc.digests[0] if len(doc.digests) == 1 else hashlib.blake2b(
                    b"".join(doc.digests), digest_size=16).digest()
                if doc.signature is None and doc.bins is not None:
                    doc.signature = densify(doc.bins, seed)
                removal = deduper.check(digest, doc.signature, doc.source)
                if removal is None:
                    writer.write(splitter.split(kept), doc)
                    kept += 1
                else:
                    removed_bytes += doc.bytes
                    report.write(json.dumps(removal.as_dict(), ensure_ascii=False) + "\n")
                if doc.spill is not None:
                    doc.spill.close()
                    os.unlink(tmp / ".spill")
                doc = _PendingDoc()
    finally:
        bar.close()
        if pool is not None:
            _stop_pool(pool)
        writer.close()
        report.close()
        if doc.spill is not None:
            doc.spill.close()

    if kept == 0:
        raise UserError("the inputs hold no documents (all empty, skipped or duplicates)")
    if stats.bad_records_skipped:
        log(f"skipped {stats.bad_records_skipped} bad record(s), e.g. {stats.bad_record_examples[0]}")
    split_by = "documents"
    counts = writer.counts
    if needs_position_split(kept, splitter.f, counts["val"].documents, counts["train"].documents):
        split_by = "position"
        counts = {s: SplitCounts(**c) for s, c in
                  split_by_position(tmp, tok, dtype, kept, splitter.split, splitter.f).items()}
        log(f"{kept} document(s) are too few to split by document: split by position instead (the first "
            f"{1 - splitter.f:.0%} of the tokens to train, the rest to val, cut at a line boundary): "
            f"{counts['train'].tokens:,} / {counts['val'].tokens:,} tokens")
    if counts["train"].tokens == 0:
        raise UserError(f"the train split would be empty ({kept} document(s), {counts['val'].tokens} token(s), "
                        f"--val-fraction {splitter.f}): give more text or a smaller --val-fraction")
    if splitter.f > 0 and counts["val"].documents == 0:
        log(f"warning: the val split is empty ({kept} document(s) with --val-fraction {splitter.f}); "
            "the input is too short to hold out any of it")
    summary = deduper.summary()
    summary.update(removed_bytes=removed_bytes, report="dedup.jsonl")
    return {
        "format": FORMAT_VERSION,
        "dtype": dtype_name,
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "tokenizer_fingerprint": tok.fingerprint,
        "tokenizer": tok_dir,
        "normalization": getattr(tok, "normalization", None),
        "lowercase": bool(getattr(tok, "lowercase", False)),
        "splits": {s: vars(counts[s]) for s in SPLITS},
        "split_by": split_by,
        "layout": "every document is followed by one EOS; <split>.idx holds uint64 offsets just past each EOS",
        "dedup": summary,
        "val_fraction": splitter.f,
        "seed": splitter.seed,
        "read": {"format": read.format, "split_on": read.split_on, "field": read.field, "errors": read.errors,
                 "on_bad_line": read.on_bad_line, **stats.as_dict()},
    }


def iter_split_documents(data_dir: str | os.PathLike, split: str = "train", tokenizer=None) -> Iterator[str]:
    """Decode a split back into its documents (without the EOS separators)."""
    from .meta import document_ends, open_tokens

    meta = read_meta(data_dir)
    if tokenizer is None:
        tokenizer, _ = _load_tokenizer(meta["tokenizer"])
    tokens = open_tokens(data_dir, split, meta)
    start = 0
    for end in document_ends(data_dir, split, meta):
        yield tokenizer.decode(tokens[start : int(end) - 1].tolist())
        start = int(end)
