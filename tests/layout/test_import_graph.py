"""The import graph of carbonsr_cli/ and models/ has no cycle (issue 16).

Walks the AST of every module, builds the graph of imports between the project's modules and
reports every cycle. Imports inside functions count too (a function-level import that only hides
a cycle is still a cycle); ``if TYPE_CHECKING:`` imports do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("carbonsr_cli", "models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(path: Path, name: str, is_pkg: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for sub in node.body:
                for n in ast.walk(sub):
                    skip.add(id(n))
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` depends on the submodule ``sub`` where it is one, else on
            # ``pkg`` (resolved against the module list in import_graph)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imp in imported_names(path, name, path.name == "__init__.py"):
            # the longest project module that the import names (``a.b.c`` -> ``a.b`` if ``c``
            # is a function of ``a.b``)
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package ``__init__`` re-exporting its submodules is not a cycle with them: drop the
    edges from a package to its own submodules (a submodule importing its package's
    ``__init__`` still counts)."""
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_cycles():
    cycles = find_cycles(_package_parents(import_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_models_never_import_the_cli():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("carbonsr_cli"))
           for m, deps in graph.items() if m.startswith("models")}
    assert not {m: d for m, d in bad.items() if d}


if __name__ == "__main__":
    for c in find_cycles(_package_parents(import_graph())):
        print(" <-> ".join(c))


def test_inference_reads_checkpoints_without_train():
    """Downscaling and the checkpoint format never import the training package."""
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith("carbonsr_cli.train"))
           for m, deps in graph.items()
           if m.startswith("carbonsr_cli.downscale") or m == "carbonsr_cli.checkpoints"}
    assert not {m: d for m, d in bad.items() if d}
