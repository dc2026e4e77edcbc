"""The package has no import circles.

The graph is read with ``ast`` from every module under ``promptlab/``. An edge A -> B is any import
of B written in A: at module level, inside a function (lazy imports run too, just later), and under
``if TYPE_CHECKING:`` (a circle a type checker must untangle is still a circle for a reader). The
implicit import of a parent package (``import promptlab.data.items`` runs ``promptlab/data/__init__``)
is not an edge: it would make every package its children's dependant and hide nothing a reader
follows. ``importlib.import_module("...")`` strings (``promptlab.__getattr__``, recipe components)
are not edges either: they name modules chosen at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "promptlab"


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the promptlab modules it imports (see the module docstring for what counts)."""
    mods = _modules(package)

    def known(name: str) -> str | None:  # the module itself, or the longest module prefix of a name
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from promptlab import trust` names a module; `from promptlab.x import f` a name in x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                dep = known(t)
                if dep and dep != mod:
                    graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_has_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "promptlab"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from promptlab.b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from promptlab import a\n"
    )
    (pkg / "data" / "c.py").write_text("from . import d\nfrom ..a import f\n")
    (pkg / "data" / "d.py").write_text("import promptlab.data.c\n")
    graph = import_graph(pkg)
    assert graph["promptlab.a"] == {"promptlab.b"} and graph["promptlab.b"] == {"promptlab.a"}
    assert graph["promptlab.data.c"] == {"promptlab.data.d", "promptlab.a"}
    assert find_cycle(graph) in (["promptlab.a", "promptlab.b", "promptlab.a"],)
    (pkg / "b.py").write_text("")
    assert find_cycle(import_graph(pkg)) == ["promptlab.data.c", "promptlab.data.d", "promptlab.data.c"]
