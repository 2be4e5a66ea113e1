"""Where the reference data lives (../shared/data, or $GPT2KIT_SHARED_DATA), for fixtures and tests.

A module of its own, not conftest: `from conftest import ...` resolves to whichever conftest.py was
imported first, which depends on the directories pytest collects.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2KIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a clear reason if it is not there."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data not available: {p} (set GPT2KIT_SHARED_DATA to the shared/data folder)")
    return p
