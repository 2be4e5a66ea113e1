"""The one exception type for user mistakes.

Library code raises `UserError` for anything a user can fix (a missing file, a bad flag, a corrupt
checkpoint). The CLI turns it into one line on stderr and exit code 2, without a traceback; the Python
API lets it propagate like any other exception.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: the message names what is wrong and what was expected."""


def require_file(path, what: str = "file"):
    """Return `path` as a Path, or raise UserError if it is not an existing file."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} is not a file: {p}")
    return p


def require_dir(path, what: str = "directory"):
    """Return `path` as a Path, or raise UserError if it is not an existing directory."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_dir():
        raise UserError(f"{what} is not a directory: {p}")
    return p
