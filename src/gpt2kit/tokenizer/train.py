"""The BPE learner: count pre-tokenized words, then merge the most frequent adjacent pair, repeatedly.

Algorithm (the same as Hugging Face `tokenizers`' BpeTrainer, so results are comparable):
1. Pre-tokenize every document with the GPT-2 pattern and count the distinct pieces ("words"), in
   parallel worker processes. A 30 MB corpus has only ~10^5 distinct words, so everything after this
   step works on distinct words with counts, never on the text.
2. Each word becomes a list of byte ids. Count every adjacent pair (weighted by word count) and remember
   which words hold it (pair -> set of word indices; stale members are allowed and skipped).
3. Pop the pair with the highest count from a max-heap. Ties go to the smallest (left id, right id),
   where single bytes have GPT-2's ids (its byte<->unicode table order, which is also HF's alphabet
   order) and each new token gets the next id: HF's tie-break exactly. Every merge is the one with the
   most negative change in corpus length, Δℓ = −count(a, b).
4. Rewrite only the words that hold the pair, updating pair counts incrementally: each occurrence
   removes (left, a) and (b, right) and adds (left, ab) and (ab, right). Counts of existing pairs only
   ever fall (every new pair contains the new token), so heap entries are upper bounds: a popped entry
   whose count is stale is pushed back with its true count (lazy invalidation), never recounted.
5. Stop at the requested vocabulary size, or when the best count is below `min_frequency`.

A merge whose result equals an existing token (the same bytes reached by another split) is skipped:
each token must come from exactly one merge so that tiktoken's rank-based encoding and the merge-list
encoding of GPT-2/HF give identical ids.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex

from ..errors import UserError
from .pretokenize import byte_order, gpt2_regex, make_normalizer

SHIFT = 32
MASK = (1 << SHIFT) - 1
CHUNK_CHARS = 1 << 20  # split long texts into ~1M-character pieces for the worker processes
PARALLEL_MIN_CHARS = 4 << 20  # below this, starting processes costs more than it saves


# ---------------------------------------------------------------- reading and counting
def read_text_file(path: Path, errors: str = "strict") -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"input is a directory, expected a text file: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read input file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}); "
            "use --errors replace (errors='replace') to read it with U+FFFD substitutes"
        ) from None


_CUT_POINT = regex.compile(r"\S(?=\n)")


def split_for_workers(text: str, size: int = CHUNK_CHARS) -> list[str]:
    r"""Cut `text` into pieces of about `size` characters where the GPT-2 pattern always ends a piece,
    so counting the pieces separately gives exactly the counts of the whole.

    The cut goes between a non-space character and a newline: no piece of the pattern spans
    non-space and whitespace, and the text after the cut is split as if it started there (the pattern
    has no look-behind). Cutting inside a whitespace run would not be safe (`\s+(?!\S)` and `\s++$`
    look at what follows).
    """
    chunks = []
    start = 0
    while len(text) - start > size:
        m = _CUT_POINT.search(text, start + size)
        if m is None:
            break
        chunks.append(text[start : m.end()])
        start = m.end()
    chunks.append(text[start:])
    return chunks


def _count_into(counts: Counter, sources: list, normalization, lowercase, errors, done=None) -> Counter:
    normalize = make_normalizer(normalization, lowercase)
    findall = gpt2_regex().findall
    for src in sources:
        text = read_text_file(src, errors) if isinstance(src, Path) else src
        if normalize is not None:
            text = normalize(text)
        counts.update(findall(text))
        if done is not None:  # the same units as the sizes in count_words: bytes of files, chars of texts
            done(src.stat().st_size if isinstance(src, Path) else len(src))
    return counts


def _count_task(task: tuple[list, str | None, bool, str]) -> tuple[Counter, int]:
    """Worker: count GPT-2 pieces over a batch of sources (texts or file paths)."""
    sources, normalization, lowercase, errors = task
    chars = 0

    def done(n: int) -> None:
        nonlocal chars
        chars += n

    return _count_into(Counter(), sources, normalization, lowercase, errors, done), chars


def _names_a_file(item: str) -> bool:
    """A short one-line str that is the path of an existing file is read as that file (as Hugging Face's
    `train(files)` would); anything else is text. Pass `pathlib.Path` to be explicit."""
    return len(item) < 4096 and "\n" not in item and os.path.isfile(item)


def _as_sources(texts_or_files) -> list[str | Path]:
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    sources: list[str | Path] = []
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            p = Path(item)
            if not p.exists():
                raise UserError(f"input file not found: {p}")
            if not p.is_file():
                raise UserError(f"input is not a file: {p}")
            sources.append(p)
        elif isinstance(item, str) and _names_a_file(item):
            sources.append(Path(item))
        elif isinstance(item, str):
            sources.extend(split_for_workers(item))
        else:
            raise UserError(
                f"training input must be str texts or pathlib.Path files, got {type(item).__name__}"
            )
    return sources


def count_words(
    texts_or_files,
    normalization: str | None = None,
    lowercase: bool = False,
    workers: int | None = None,
    errors: str = "strict",
    progress: bool = False,
) -> Counter:
    """Counts of GPT-2 pre-tokenized pieces over all inputs (files are read as UTF-8)."""
    from tqdm.auto import tqdm

    sources = _as_sources(texts_or_files)
    sizes = [s.stat().st_size if isinstance(s, Path) else len(s) for s in sources]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    bar = tqdm(
        total=sum(sizes),
        desc="pre-tokenizing",
        unit="B",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
    )
    with bar:
        if workers <= 1 or sum(sizes) < PARALLEL_MIN_CHARS or len(sources) < 2:
            return _count_into(Counter(), sources, normalization, lowercase, errors, bar.update)
        # Deal sources to batches, largest first onto the lightest batch; several batches per worker
        # balance the load and let the progress bar move.
        n_batches = min(len(sources), 8 * workers)
        batches: list[list] = [[] for _ in range(n_batches)]
        loads = [0] * n_batches
        for size, src in sorted(zip(sizes, sources, strict=True), key=lambda t: -t[0]):
            j = loads.index(min(loads))
            batches[j].append(src)
            loads[j] += size
        import multiprocessing as mp

        # fork: workers need nothing but this module, and "spawn" would re-run a user's script that lacks
        # an `if __name__ == "__main__"` guard. Workers only run `regex` and `Counter`.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        total: Counter = Counter()
        with ctx.Pool(workers) as pool:
            tasks = [(b, normalization, lowercase, errors) for b in batches]
            for counts, chars in pool.imap_unordered(_count_task, tasks):
                total.update(counts)
                bar.update(chars)
        return total


# ---------------------------------------------------------------- the merge loop
def merge_words(
    words: list[list[int]],
    freqs: list[int],
    n_merges: int,
    first_id: int,
    token_bytes: list[bytes],
    min_frequency: int = 2,
    progress: bool = False,
) -> list[tuple[int, int]]:
    """Learn up to `n_merges` merges over `words` (lists of ids, modified in place) with counts `freqs`.

    `token_bytes[i]` is the byte string of id i (extended as tokens are created; new ids start at
    `first_id`). Returns the merges as (left id, right id); merge k created id first_id + k.
    """
    pair_counts: dict[int, int] = {}
    where: dict[int, set[int]] = {}  # pair -> words that held it when it was counted
    for wi, w in enumerate(words):
        f = freqs[wi]
        for i in range(len(w) - 1):
            k = w[i] << SHIFT | w[i + 1]
            pair_counts[k] = pair_counts.get(k, 0) + f
            s = where.get(k)
            if s is None:
                where[k] = {wi}
            else:
                s.add(wi)
    heap = [(-c, k) for k, c in pair_counts.items()]
    heapq.heapify(heap)
    known_tokens = set(token_bytes)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_merges, desc="merges", unit="merge", disable=not progress, mininterval=0.5)
    merges: list[tuple[int, int]] = []
    new_id = first_id
    skipped = 0
    heappop, heappush = heapq.heappop, heapq.heappush
    pc_get = pair_counts.get
    while len(merges) < n_merges and heap:
        neg, key = heappop(heap)
        count = pc_get(key, 0)
        if count != -neg:  # stale: the pair lost occurrences since this entry was pushed
            if count > 0:
                heappush(heap, (-count, key))
            continue
        if count < min_frequency:
            break
        a, b = key >> SHIFT, key & MASK
        merged_bytes = token_bytes[a] + token_bytes[b]
        if merged_bytes in known_tokens:
            # Same bytes as an earlier token (see module docstring): never merge this pair. Its count
            # stays tracked (words still hold it); it simply never returns to the heap.
            skipped += 1
            continue
        del pair_counts[key]
        rows = where.pop(key, ())
        known_tokens.add(merged_bytes)
        token_bytes.append(merged_bytes)
        merges.append((a, b))
        new = new_id
        new_id += 1
        # Pairs that contain `new` did not exist before this merge: count them apart, push them at the end.
        new_counts: dict[int, int] = {}
        new_where: dict[int, list[int]] = {}
        nc_get = new_counts.get
        for wi in rows:
            w = words[wi]
            if a not in w:  # stale member of the index
                continue
            f = freqs[wi]
            i = w.index(a)
            n = len(w)
            while True:
                if i + 1 < n and w[i + 1] == b:
                    # Left neighbour as it is now (it may be `new` from the previous occurrence: then the
                    # (new, a) pair counted a moment ago is taken back), right neighbour as it was.
                    if i:
                        x = w[i - 1]
                        if x == new:
                            k = new << SHIFT | a
                            new_counts[k] -= f
                        else:
                            k = x << SHIFT | a
                            if k != key:
                                pair_counts[k] -= f
                        k = x << SHIFT | new
                        new_counts[k] = nc_get(k, 0) + f
                        if k in new_where:
                            new_where[k].append(wi)
                        else:
                            new_where[k] = [wi]
                    if i + 2 < n:
                        y = w[i + 2]
                        k = b << SHIFT | y
                        if k != key:
                            pair_counts[k] -= f
                        k = new << SHIFT | y
                        new_counts[k] = nc_get(k, 0) + f
                        if k in new_where:
                            new_where[k].append(wi)
                        else:
                            new_where[k] = [wi]
                    w[i] = new
                    del w[i + 1]
                    n -= 1
                i += 1
                if i >= n - 1 or a not in w[i:]:
                    break
                i = w.index(a, i)
        for k, c in new_counts.items():
            if c > 0:
                pair_counts[k] = c
                where[k] = set(new_where[k])
                heappush(heap, (-c, k))
        if len(merges) % 256 == 0:
            bar.update(256)
    bar.update(len(merges) % 256)
    bar.close()
    return merges


# ---------------------------------------------------------------- the learner
def check_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    if isinstance(special_tokens, str):
        special_tokens = [special_tokens]
    out: list[str] = []
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise UserError(f"special tokens must be non-empty strings, got {s!r}")
        if s in out:
            raise UserError(f"special token {s!r} is given twice")
        out.append(s)
    return out


def learn_bpe(
    texts_or_files: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    normalization: str | None = None,
    lowercase: bool = False,
    progress: bool = True,
    workers: int | None = None,
    errors: str = "strict",
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int]]:
    """Learn (ranks, merges, special_tokens). Ids: 0..255 single bytes in GPT-2's order, then merges in
    the order learned, then the special tokens (so a GPT-2-shaped vocabulary ends with <|endoftext|>)."""
    specials = check_special_tokens(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise UserError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least 256 + "
            f"{len(specials)} special token(s) = {256 + len(specials)}"
        )
    if min_frequency < 1:
        raise UserError(f"min frequency must be >= 1, got {min_frequency}")
    if errors not in ("strict", "replace"):
        raise UserError(f"errors must be 'strict' or 'replace', got {errors!r}")
    counts = count_words(texts_or_files, normalization, lowercase, workers, errors, progress)
    if not counts:
        raise UserError("the training corpus is empty (no text in the inputs)")

    order = byte_order()
    to_id = bytearray(256)
    for i, b in enumerate(order):
        to_id[b] = i
    table = bytes(to_id)
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, f in counts.items():
        if len(word) > 1 or ord(word) > 127:  # one ASCII char is one byte: nothing to merge
            ids = list(word.encode("utf-8").translate(table))
            if len(ids) > 1:
                words.append(ids)
                freqs.append(f)
    del counts
    token_bytes = [bytes([b]) for b in order]
    n_merges = vocab_size - 256 - len(specials)
    pair_merges = merge_words(words, freqs, n_merges, 256, token_bytes, min_frequency, progress)

    ranks = {t: i for i, t in enumerate(token_bytes)}
    merges = [(token_bytes[a], token_bytes[b]) for a, b in pair_merges]
    special_ids = {s: len(ranks) + j for j, s in enumerate(specials)}
    return ranks, merges, special_ids
