"""The package's shape (docs/architecture.md): modules import each other without cycles, an
import inside a function says why it is there, and the HTTP layer stays the only one that
knows about HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "serve_app"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.AST) -> set[str]:
    """serve_app modules this tree imports (``from serve_app.x import y`` counts y when y is
    a module, else x)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("serve_app"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        top_level = ast.Module(body=[n for n in tree.body if not isinstance(n, ast.If)
                                     or "TYPE_CHECKING" not in ast.unparse(n.test)], type_ignores=[])
        graph[name] = {m for m in imported_modules(top_level) if m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own modules is how packages work: not a cycle
            if state.get(nxt) == "open" and not node.startswith(nxt + "."):
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_say_why():
    """An import inside a function (a lazy dependency, a cycle avoided) carries its reason
    as a comment on its line or the line above."""
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        here, above = lines[inner.lineno - 1], lines[inner.lineno - 2]
                        if "#" not in here and not above.strip().startswith("#"):
                            unexplained.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {here.strip()}")
    assert not unexplained, unexplained


def test_only_the_http_layer_imports_the_web_framework():
    """Codecs, the serving layer and the deployments speak Python objects, not HTTP."""
    web = ("fastapi", "starlette")
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("serve_app.http"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {m}" for m in modules if m.split(".")[0] in web]
    assert not offenders, offenders


def test_the_serving_layer_does_not_import_deployments_or_http():
    """The registry and workers are plain Python: the layers above wire them to Serve."""
    graph = import_graph()
    leaks = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("serve_app.serving")
             for d in deps if d.startswith(("serve_app.deployments", "serve_app.http"))]
    assert not leaks, leaks
