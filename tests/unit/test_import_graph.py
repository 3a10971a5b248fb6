"""The import graph of agent/, packager/, fleet/ and edgepack/: no cycle, and dependencies point one
way (packager and fleet import agent; agent imports neither; packaging never imports the fleet;
only the host entry point, edgepack/, composes both).

Every import statement counts, including the lazy ones inside functions: a lazy cycle is still two
modules that cannot be understood (or moved) one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "packager", "fleet", "edgepack")
# package -> the packages it must never import
FORBIDDEN = {
    "agent": {"packager", "fleet", "edgepack"},
    "packager": {"fleet", "edgepack"},
    "fleet": {"packager", "edgepack"},
    "edgepack": set(),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``path`` imports (``from pkg import sub`` counts as pkg.sub)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            # the longest known module that the import names
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports_of(n, p, known) for n, p in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(g, WHITE)
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        stack.append(n)
        for m in sorted(g[n]):
            if color[m] == GREY:
                return [*stack[stack.index(m):], m]
            if color[m] == WHITE and (c := visit(m)):
                return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(g):
        if color[n] == WHITE and (c := visit(n)):
            return c
    return None


def test_the_walk_sees_our_modules_and_their_imports():
    # Positive control: the walker finds the modules and the edges we know are there.
    g = graph()
    assert {"agent.cli", "agent.daemon", "packager.build", "fleet.cli", "edgepack.cli"} <= set(g)
    assert "agent.bundle.manifest" in g["agent.bundle"]
    assert {"packager.cli", "fleet.cli"} <= g["edgepack.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_there_is_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str):
    bad = sorted(f"{src} -> {dst}" for src, dsts in graph().items() if src.split(".")[0] == package
                 for dst in dsts if dst.split(".")[0] in FORBIDDEN[package])
    assert not bad, "\n".join(bad)
