"""Documents out of files: text, folders, globs, JSONL, Parquet, stdin, and the built-in default corpus.

Everything streams. The unit handed to the shard writer is a `Piece`: a document's text, or -- for a
document larger than `max_piece_chars` (a multi-GB text file read as one document) -- one of several
consecutive parts of it, the last with `last=True`. Parts are cut just before a space or newline that
follows a non-space character: GPT-2's pre-tokenizer always splits there and Unicode normalization never
composes across it, so encoding the parts one by one gives exactly the ids of the whole document.

Text is decoded as UTF-8 from the raw bytes (no newline translation), so shards decode back to the
files byte for byte. `.gz`, `.bz2` and `.xz` files are decompressed on the fly.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError

FORMATS = ("auto", "text", "jsonl", "parquet")
MAX_PIECE_CHARS = 8 << 20  # documents above this many characters are handed on in parts
_BLOCK_BYTES = 4 << 20
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
STDIN = "-"


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path", "path#k" (k-th separated document), "path:line" (JSONL), "path:row n", "<stdin>"


@dataclass(frozen=True)
class Piece:
    text: str
    source: str
    last: bool = True  # False: the document continues in the next piece


@dataclass(frozen=True)
class FilePiece:
    """A whole file that is one document, named rather than read: `prepare` hands these to its tokenizer
    workers, which read the file themselves (`read()`), so the text never passes through the main process
    or a pipe. `errors` is the UTF-8 policy ("strict" | "replace"), or "source" for Python sources
    (PEP 263 coding line honoured, undecodable bytes replaced) as the default corpus reads them."""

    path: str
    errors: str
    size: int  # bytes on disk (an upper bound of the characters)
    last = True  # a whole document: never continued

    @property
    def source(self) -> str:
        return self.path

    def read(self) -> str:
        if self.errors == "source":
            return _read_source(self.path)
        with _open_binary(self.path) as f:
            data = f.read()
        try:
            return data.decode("utf-8", self.errors)
        except UnicodeDecodeError as e:
            raise _decode_error(self.path, 0, e) from None


@dataclass
class ReadOptions:
    format: str = "auto"  # auto | text | jsonl | parquet
    split_on: str | None = None  # text: documents are separated by this string (removed); None = one per file
    field: str = "text"  # JSONL / Parquet field that holds the text
    errors: str = "strict"  # UTF-8 decoding: strict | replace
    on_bad_line: str = "fail"  # JSONL / Parquet record without a string field: fail | skip
    max_piece_chars: int = MAX_PIECE_CHARS

    def __post_init__(self):
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.errors not in ("strict", "replace"):
            raise UserError(f"--errors must be 'strict' or 'replace', got {self.errors!r}")
        if self.on_bad_line not in ("fail", "skip"):
            raise UserError(f"--on-bad-line must be 'fail' or 'skip', got {self.on_bad_line!r}")
        if self.split_on == "":
            raise UserError("--split-on must not be empty")


@dataclass
class ReadStats:
    files: int = 0
    empty_files_skipped: int = 0
    bad_records_skipped: int = 0
    bad_record_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "empty_files_skipped": self.empty_files_skipped,
            "bad_records_skipped": self.bad_records_skipped,
        }


@dataclass(frozen=True)
class InputFile:
    path: str  # a file path, or "-" for stdin
    explicit: bool  # named on the command line (an empty one is an error) vs found in a folder/glob


def unescape_separator(sep: str) -> str:
    r"""`--split-on '\n\n'` as typed in a shell means two newlines."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
    while i < len(sep):
        if sep[i] == "\\" and i + 1 < len(sep) and sep[i + 1] in table:
            out.append(table[sep[i + 1]])
            i += 2
        else:
            out.append(sep[i])
            i += 1
    return "".join(out)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _walk_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
    return found


def resolve_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand files, folders (recursive, hidden entries skipped) and globs, in order; '-' is stdin."""
    if not inputs:
        raise UserError("no --input given")
    files: list[InputFile] = []
    for spec in inputs:
        if spec == STDIN:
            files.append(InputFile(STDIN, True))
            continue
        p = Path(spec)
        if p.is_file():
            files.append(InputFile(str(p), True))
        elif p.is_dir():
            found = _walk_files(p)
            if not found:
                raise UserError(f"--input folder has no files: {p}")
            files.extend(InputFile(str(f), False) for f in found)
        elif glob.has_magic(spec):
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True))
            found = [f for f in found if f.is_file()]
            if not found:
                raise UserError(f"--input pattern matches no files: {spec}")
            files.extend(InputFile(str(f), False) for f in found)
        elif p.exists():
            raise UserError(f"--input is not a regular file or folder: {p}")
        else:
            raise UserError(f"--input not found: {p}")
    return files


def _base_suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, compression suffix) of a file name: 'a.jsonl.gz' -> ('.jsonl', '.gz')."""
    p = Path(path)
    suffixes = [s.lower() for s in p.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSED else None
    rest = suffixes[:-1] if comp else suffixes
    return (rest[-1] if rest else ""), comp


def file_format(path: str, requested: str) -> str:
    if requested != "auto":
        return requested
    if path == STDIN:
        return "text"
    suffix, _ = _base_suffix(path)
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _open_binary(path: str) -> BinaryIO:
    if path == STDIN:
        return sys.stdin.buffer
    _, comp = _base_suffix(path)
    try:
        return _COMPRESSED[comp](path, "rb") if comp else open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise UserError(f"cannot read --input {path}: {e.strerror or e}") from None


def _display(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def _safe_cut(text: str, limit: int) -> int:
    """Largest cut <= limit just before a space/newline that follows a non-space (0 if none)."""
    for ws in ("\n", " "):
        i = text.rfind(ws, 1, limit + 1)
        while i > 0:
            if not text[i - 1].isspace():
                return i
            i = text.rfind(ws, 1, i)
    return 0


def _decode_error(path: str, offset: int, e: UnicodeDecodeError) -> UserError:
    return UserError(
        f"{_display(path)}: not valid UTF-8 at byte {offset + e.start} (pass --errors replace to substitute U+FFFD)"
    )


def _iter_text(path: str, opts: ReadOptions, explicit: bool, stats: ReadStats) -> Iterator[Piece]:
    """Pieces of one text file: the whole file as one document, or documents split on `opts.split_on`."""
    sep = opts.split_on
    name = _display(path)
    decoder = codecs.getincrementaldecoder("utf-8")(opts.errors)
    limit = opts.max_piece_chars
    buf = ""
    open_doc = False  # a document has been started (parts emitted) and not finished
    k = 0  # index of the next separated document, for its source name
    offset = 0  # bytes read so far, for error messages
    any_bytes = False

    def source() -> str:
        return name if sep is None else f"{name}#{k}"

    with _open_binary(path) as f:
        while True:
            block = f.read(_BLOCK_BYTES)
            final = not block
            any_bytes = any_bytes or bool(block)
            try:
                buf += decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                raise _decode_error(path, offset, e) from None
            offset += len(block)
            if sep is not None:
                parts = buf.split(sep)
                buf = parts.pop()
                for part in parts:
                    if part or open_doc:
                        yield Piece(part, source(), True)
                        k += 1
                    open_doc = False
            if final:
                break
            while len(buf) > limit:  # an oversized document: hand on a part now
                # never cut into a separator that may be completed by the next block
                cut = _safe_cut(buf, min(limit, len(buf) - len(sep or ""))) or limit  # no whitespace: hard cut
                yield Piece(buf[:cut], source(), False)
                buf, open_doc = buf[cut:], True
    if not any_bytes:
        if explicit:
            raise UserError(f"--input is empty: {name}")
        stats.empty_files_skipped += 1
        return
    if buf or open_doc:
        yield Piece(buf, source(), True)


def _record_text(obj, opts: ReadOptions, where: str, stats: ReadStats) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get(opts.field), str):
        return obj[opts.field]
    what = "not a JSON object" if not isinstance(obj, dict) else f"no string field {opts.field!r}"
    return _bad_record(f"{where}: {what}", opts, stats)


def _bad_record(message: str, opts: ReadOptions, stats: ReadStats) -> None:
    if opts.on_bad_line == "fail":
        raise UserError(f"{message} (pass --on-bad-line skip to skip such records)")
    stats.bad_records_skipped += 1
    if len(stats.bad_record_examples) < 5:
        stats.bad_record_examples.append(message)
    return None


def _iter_jsonl(path: str, opts: ReadOptions, explicit: bool, stats: ReadStats) -> Iterator[Piece]:
    name = _display(path)
    any_line = False
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            any_line = True
            try:
                line = raw.decode("utf-8", opts.errors)
            except UnicodeDecodeError as e:
                raise UserError(f"{name}:{lineno}: not valid UTF-8 at byte {e.start} of the line") from None
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _bad_record(f"{where}: invalid JSON ({e.msg} at column {e.colno})", opts, stats)
                continue
            text = _record_text(obj, opts, where, stats)
            if text:
                yield Piece(text, where, True)
    if not any_line:
        if explicit:
            raise UserError(f"--input is empty: {name}")
        stats.empty_files_skipped += 1


def _iter_parquet(path: str, opts: ReadOptions, explicit: bool, stats: ReadStats) -> Iterator[Piece]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install 'gpt2kit[parquet]'") from None
    if path == STDIN:
        raise UserError("Parquet cannot be read from stdin; pass a file")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    if opts.field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {opts.field!r} (columns: {', '.join(pf.schema_arrow.names)}); use --field")
    if pf.metadata.num_rows == 0:
        if explicit:
            raise UserError(f"--input is empty: {path}")
        stats.empty_files_skipped += 1
        return
    row = 0
    for batch in pf.iter_batches(columns=[opts.field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            row += 1
            if not isinstance(value, str):
                _bad_record(f"{where}: column {opts.field!r} is not a string ({type(value).__name__})", opts, stats)
            elif value:
                yield Piece(value, where, True)


_READERS = {"text": _iter_text, "jsonl": _iter_jsonl, "parquet": _iter_parquet}


def iter_pieces(
    inputs: Sequence[str] | Sequence[InputFile], opts: ReadOptions | None = None, stats: ReadStats | None = None,
    defer_whole_files: bool = False,
) -> Iterator[Piece | FilePiece]:
    """Stream the pieces of every document of `inputs` in order (see the module doc).

    With `defer_whole_files`, a plain (uncompressed) text file that is one document and small enough to
    be one piece comes out as a `FilePiece` to be read by whoever consumes it."""
    opts = opts or ReadOptions()
    stats = stats if stats is not None else ReadStats()
    files = [f if isinstance(f, InputFile) else None for f in inputs]
    if any(f is None for f in files):
        files = resolve_inputs([str(f) for f in inputs])
    for f in files:
        stats.files += 1
        fmt = file_format(f.path, opts.format)
        if defer_whole_files and fmt == "text" and opts.split_on is None and f.path != STDIN \
                and _base_suffix(f.path)[1] is None:
            size = _file_size(f.path)
            if 0 < size <= opts.max_piece_chars:  # bytes >= characters: one piece
                yield FilePiece(f.path, opts.errors, size)
                continue
        yield from _READERS[fmt](f.path, opts, f.explicit, stats)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise UserError(f"cannot read --input {path}: {e.strerror or e}") from None


def join_pieces(pieces: Iterable[Piece]) -> Iterator[Document]:
    parts: list[str] = []
    for piece in pieces:
        parts.append(piece.text)
        if piece.last:
            yield Document("".join(parts), piece.source)
            parts = []


def iter_documents(
    inputs: Sequence[str], opts: ReadOptions | None = None, stats: ReadStats | None = None, **kwargs
) -> Iterator[Document]:
    """Whole documents of `inputs` (keyword arguments are ReadOptions fields: format, split_on, field, ...)."""
    opts = opts or ReadOptions(**kwargs)
    return join_pieces(iter_pieces(inputs, opts, stats))


# --- the built-in default corpus ------------------------------------------------------------------------

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
DEFAULT_CORPUS_NAME = "python-stdlib"


def _default_corpus_paths() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    topics = os.path.join(root, "pydoc_data", "topics.py")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return [f for f in files if f != topics]


def default_corpus_files() -> list[Path]:
    """This interpreter's standard-library `.py` files (site-/dist-packages excluded), sorted.

    `pydoc_data/topics.py` is left out: its help topics come in as prose documents instead.
    """
    return [Path(f) for f in _default_corpus_paths()]


def _read_source(path: str | Path) -> str:
    """A Python source file as text, honouring its PEP 263 coding line; undecodable bytes become U+FFFD."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError:
        encoding = "utf-8"
    return data.decode(encoding, "replace")


def default_corpus() -> Iterator[Document]:
    """The Python standard library of the running interpreter, one document per `.py` file, then the
    `pydoc_data` help topics, one document per topic. Needs no download; ~32 MB on CPython 3.11."""
    for piece in default_corpus_pieces():
        yield Document(piece.text, piece.source)


def default_corpus_pieces(defer_files: bool = False) -> Iterator[Piece | FilePiece]:
    """`default_corpus()` as pieces; with `defer_files` the `.py` files come as `FilePiece`s, unread."""
    for path in _default_corpus_paths():
        if defer_files:
            size = os.path.getsize(path)
            if size:
                yield FilePiece(path, "source", size)
            continue
        text = _read_source(path)
        if text:
            yield Piece(text, path)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down interpreter
        return
    for name in sorted(topics):
        if topics[name]:
            yield Piece(topics[name], f"pydoc_data.topics:{name}")
