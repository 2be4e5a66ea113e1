"""Tokenizer file formats: GPT-2 `encoder.json`+`vocab.bpe`, Hugging Face `vocab.json`+`merges.txt` (or a
GPT-2-style `tokenizer.json` alone, read only), and tiktoken's rank file.

In memory a tokenizer is three things: `ranks` (token bytes -> id for the 256 single bytes and every merge
result), `merges` (ordered list of (bytes, bytes)), and `special_tokens` (text -> id). The GPT-2 and HF
formats are the same two files under different names: a JSON vocabulary of byte-level strings (bytes
spelled with GPT-2's byte<->unicode table) and a merge list, one "a b" pair per line after a
`#version` header. Readers check consistency so a corrupt file fails with one line naming it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from ..errors import UserError, require_file
from ..fileio import atomic_write_json, atomic_write_text
from .pretokenize import byte_order, token_to_unicode, unicode_to_token

MERGES_HEADER = "#version: 0.2"


def check_ranks_follow_merges(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], where: str) -> None:
    """tiktoken merges by the rank of the concatenation, OpenAI/HF by the merge's position in the list.

    They agree when every merge result is a distinct token whose id increases along the merge list and
    is above the ids of its parts, which is what this checks (GPT-2's files and ours satisfy it).
    """
    for b in range(256):
        if bytes([b]) not in ranks:
            raise UserError(f"{where}: byte {b} has no token (a byte-level vocabulary needs all 256)")
    last = -1
    for i, (a, b) in enumerate(merges):
        for part in (a, b):
            if part not in ranks:
                raise UserError(
                    f"{where}: merge {i + 1} uses {token_to_unicode(part)!r}, which is not in the vocabulary"
                )
        merged = ranks.get(a + b)
        if merged is None:
            raise UserError(
                f"{where}: the result of merge {i + 1} ({token_to_unicode(a + b)!r}) is not in the vocabulary"
            )
        if merged <= last or merged <= ranks[a] or merged <= ranks[b]:
            raise UserError(
                f"{where}: merge {i + 1} gives id {merged}, but ids must increase along the merge list "
                "(duplicate or reordered merges are not supported)"
            )
        last = merged
    if len(ranks) != 256 + len(merges):
        raise UserError(
            f"{where}: {len(ranks)} byte-level tokens but 256 + {len(merges)} merges; vocabulary and merges disagree"
        )


def read_vocab_and_merges(
    vocab_path: str | Path, merges_path: str | Path
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int]]:
    """Read `encoder.json`+`vocab.bpe` or `vocab.json`+`merges.txt` into (ranks, merges, special_tokens)."""
    vocab_path = require_file(vocab_path, "vocabulary file")
    merges_path = require_file(merges_path, "merges file")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{vocab_path}: not a JSON vocabulary ({e})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and v >= 0 for v in vocab.values()):
        raise UserError(f"{vocab_path}: expected a JSON object mapping token strings to non-negative ids")
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{vocab_path}: two tokens share an id")

    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{merges_path}: not UTF-8 (byte {e.start})") from None
    merges: list[tuple[bytes, bytes]] = []
    merged_strings: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")  # CRLF files: "\r" is never part of a byte-level token string
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise UserError(
                f"{merges_path}:{lineno}: expected two tokens separated by one space, got {line!r}"
            )
        try:
            merges.append((unicode_to_token(parts[0]), unicode_to_token(parts[1])))
        except KeyError as e:
            raise UserError(f"{merges_path}:{lineno}: {e.args[0]}") from None
        merged_strings.add(parts[0] + parts[1])

    return _split_vocab(vocab, merges, merged_strings, f"{vocab_path.name} + {merges_path.name} in {vocab_path.parent}")


def _split_vocab(
    vocab: dict[str, int], merges: list[tuple[bytes, bytes]], merged_strings: set[str], where: str
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int]]:
    ranks: dict[bytes, int] = {}
    special_tokens: dict[str, int] = {}
    single_bytes = {token_to_unicode(bytes([b])) for b in range(256)}
    for text, idx in vocab.items():
        if text in single_bytes or text in merged_strings:
            ranks[unicode_to_token(text)] = idx
        else:  # not reachable by merging: an added (special) token such as <|endoftext|>
            special_tokens[text] = idx
    check_ranks_follow_merges(ranks, merges, where)
    return ranks, merges, special_tokens


def _gpt2_style(data: dict, where: str) -> None:
    """Refuse tokenizer.json files that are not GPT-2's kind: BPE over bytes with GPT-2's pre-tokenizer."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{where}: a {model.get('type')!r} tokenizer; only byte-level BPE (GPT-2 style) is supported")
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise UserError(f"{where}: pre-tokenizer {json.dumps(pre)[:120]} is not GPT-2's (ByteLevel with its regex, "
                        "no prefix space); only GPT-2-style byte-level BPE is supported")
    if data.get("normalizer") is not None:
        raise UserError(f"{where}: a normalizer ({data['normalizer'].get('type')}) is not supported "
                        "(GPT-2-style byte-level BPE has none)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UserError(f"{where}: BPE with a {key} ({model[key]!r}) is not byte-level GPT-2 style")
    if model.get("byte_fallback") or model.get("dropout"):
        raise UserError(f"{where}: BPE with byte_fallback or dropout is not byte-level GPT-2 style")


def read_tokenizer_json(
    path: str | Path,
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]], dict[str, int]]:
    """(ranks, merges, special_tokens) from a Hugging Face `tokenizer.json` holding a GPT-2-style
    byte-level BPE (its model's vocab and merges, and the added tokens); other kinds are refused."""
    path = require_file(path, "tokenizer.json")
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object")
    _gpt2_style(data, where)
    vocab = dict(data["model"].get("vocab") or {})
    merges: list[tuple[bytes, bytes]] = []
    merged_strings: set[str] = set()
    for i, m in enumerate(data["model"].get("merges") or []):
        parts = m.split(" ") if isinstance(m, str) else m  # "a b" (older files) or ["a", "b"]
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(x, str) and x for x in parts):
            raise UserError(f"{where}: merge {i + 1} is not a pair of tokens: {m!r}")
        try:
            merges.append((unicode_to_token(parts[0]), unicode_to_token(parts[1])))
        except KeyError as e:
            raise UserError(f"{where}: merge {i + 1}: {e.args[0]}") from None
        merged_strings.add(parts[0] + parts[1])
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and isinstance(tok.get("id"), int):
            if vocab.get(tok["content"], tok["id"]) != tok["id"]:
                raise UserError(f"{where}: added token {tok['content']!r} has id {tok['id']} but the vocabulary "
                                f"gives {vocab[tok['content']]}")
            vocab[tok["content"]] = tok["id"]
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{where}: two tokens share an id")
    return _split_vocab(vocab, merges, merged_strings, where)


def write_vocab_and_merges(
    vocab_path: str | Path,
    merges_path: str | Path,
    ranks: dict[bytes, int],
    merges: list[tuple[bytes, bytes]],
    special_tokens: dict[str, int],
) -> None:
    """Write the GPT-2 / Hugging Face pair of files (same layout under either pair of names)."""
    vocab = {token_to_unicode(t): i for t, i in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab.update(special_tokens)
    atomic_write_json(vocab_path, vocab, indent=None)
    lines = [MERGES_HEADER] + [f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in merges]
    atomic_write_text(merges_path, "\n".join(lines) + "\n")


def write_tiktoken_file(path: str | Path, ranks: dict[bytes, int]) -> None:
    """tiktoken's rank file: `base64(token) rank` per line, in rank order (`tiktoken.load.load_tiktoken_bpe`)."""
    lines = [
        f"{base64.b64encode(t).decode('ascii')} {i}" for t, i in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_tiktoken_file(path: str | Path) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Read a tiktoken rank file and recover the merge list it implies (ranks alone define the BPE)."""
    path = require_file(path, "tiktoken rank file")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise UserError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    merges = merges_from_ranks(ranks, str(path))
    check_ranks_follow_merges(ranks, merges, str(path))
    return ranks, merges


def merges_from_ranks(ranks: dict[bytes, int], where: str = "ranks") -> list[tuple[bytes, bytes]]:
    """Each multi-byte token is the merge of the two parts that BPE with lower ranks leaves it in."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(
                f"{where}: token {token!r} (rank {rank}) cannot be built from lower-ranked tokens"
            )
        merges.append((parts[0], parts[1]))
    return merges


def gpt2_byte_ranks() -> dict[bytes, int]:
    """The 256 single-byte tokens with GPT-2's ids (printable bytes first; see `pretokenize.byte_order`)."""
    return {bytes([b]): i for i, b in enumerate(byte_order())}
