"""Lazy re-exports for package `__init__`s, so importing a package (e.g. for `gpt2kit --help`) does not
import torch until a name that needs it is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `exports[name]` (a module path; relative ones are taken
    inside `package`) on first use and caches the value in the package's namespace."""
    import sys

    def __getattr__(name: str) -> Any:
        if name in exports:
            where = exports[name]
            module = importlib.import_module(where if where.startswith("gpt2kit") else f"{package}.{where}")
            value = getattr(module, name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
