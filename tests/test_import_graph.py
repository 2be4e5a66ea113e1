"""The package's import graph has no cycle: lower layers never import higher ones (docs/architecture.md).

Every import statement counts, at module level or inside a function, and importing `a.b.c` also runs
the packages `a` and `a.b`, so those are edges too. Lazy re-exports (`_lazy.lazy_getattr`) are not
imports until a name is used, and are left out like any attribute access; so are `if TYPE_CHECKING:`
blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gpt2kit

ROOT = Path(gpt2kit.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks never run: leave them out
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the deepest known module named, plus every package above it (running it runs them) except
            # this module's own packages, which are already running whenever this module runs
            parts = t.split(".")
            explicit = True
            for i in range(len(parts), 0, -1):
                cand = ".".join(parts[:i])
                if cand not in known or cand == name:
                    continue
                if explicit or not name.startswith(cand + "."):
                    out.add(cand)
                explicit = False
    return {m for m in out if m.startswith("gpt2kit")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = GREY
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == GREY:
                return stack[stack.index(m):] + [m]
            if colour.get(m) == WHITE:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        colour[n] = BLACK
        return None

    for n in sorted(graph):
        if colour[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_the_walker_sees_function_level_and_parent_package_imports():
    graph = _graph()
    # gpt2kit.model.pretrained imports the sampling loop inside the module; the loop imports the cache
    assert "gpt2kit.generate" in graph["gpt2kit.model.pretrained"]
    assert "gpt2kit.model.kv_cache" in graph["gpt2kit.generate"]  # a function-level import
    assert "gpt2kit.model" in graph["gpt2kit.generate"]  # running gpt2kit.model.kv_cache runs the package
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_network_depends_on_neither_its_file_format_nor_its_users():
    graph = _graph()
    network = graph["gpt2kit.model.gpt2"]
    for user in ("gpt2kit.model.hf", "gpt2kit.model.quantized_io", "gpt2kit.generate", "gpt2kit.decode_fast",
                 "gpt2kit.model.pretrained"):
        assert user not in network
