"""What every task shares: reading JSONL with file:line errors, and turning text pairs into token pairs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import UserError, require_file
from ..scoring import Request


def read_jsonl(path: str | Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file, at most `limit` of them."""
    path = require_file(path, "task file")
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if limit is not None and len(records) >= limit:
                    break
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                records.append((lineno, obj))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not records:
        raise UserError(f"{path}: no examples (the file is empty)")
    return records


def field(path, lineno: int, obj: dict, name: str, kind: type | tuple[type, ...] = str):
    """obj[name], checked for presence and type, or a UserError naming file:line and the field."""
    if name not in obj:
        raise UserError(f"{path}:{lineno}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UserError(f"{path}:{lineno}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def _normalize(tokenizer, text: str) -> str:
    normalize = getattr(tokenizer, "normalize", None)
    return normalize(text) if normalize is not None else text


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Tokens of (context, continuation) as lm-evaluation-harness splits them.

    Trailing whitespace of the context moves to the continuation (BPE attaches a space to the word after
    it); the continuation's tokens are those of `context + continuation` after the context's own tokens,
    so the pair tokenizes exactly like the whole string would. An empty context becomes the EOS token.
    """
    context = _normalize(tokenizer, context)
    continuation = _normalize(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return Request([tokenizer.eos_id], tokenizer.encode_ordinary(continuation))
    whole = tokenizer.encode_ordinary(context + continuation)
    context_ids = tokenizer.encode_ordinary(context)
    return Request(context_ids, whole[len(context_ids) :])


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the lowest index (like numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best
