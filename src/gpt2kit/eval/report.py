"""Results as JSON (for programs) and as a Markdown table (for people)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fileio import atomic_write_text


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4e}"
        return f"{value:.4f}"
    return str(value)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False, allow_nan=True)


def to_markdown(result: dict, title: str | None = None) -> str:
    """A two-column table, metric | value (lists such as generated outputs are left out)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|"]
    for key, value in result.items():
        if isinstance(value, (list, dict)):
            continue
        lines.append(f"| {key} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: str | Path, title: str | None = None) -> tuple[Path, Path]:
    """Write `out` as JSON and the Markdown table beside it (same name, .md), both atomically.

    If `out` itself ends in .md, the table goes there and the JSON beside it (.json).
    """
    out = Path(out)
    if out.suffix == ".md":
        md_path, json_path = out, out.with_suffix(".json")
    else:
        json_path, md_path = out, out.with_suffix(".md")
    atomic_write_text(json_path, to_json(result) + "\n")
    atomic_write_text(md_path, to_markdown(result, title))
    return json_path, md_path
