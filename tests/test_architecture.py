"""Package shape: no module over 520 lines, no import cycle between subpackages.

The graph is built from the source with `ast`, not by importing: an edge A -> B means a
module of subpackage A imports something from subpackage B at run time (imports under
`if TYPE_CHECKING:` do not count, they never execute). Top-level modules (app, cli, ...)
are their own nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"
MAX_LINES = 520

# Cycles between subpackages that are accepted, each with a one-line reason.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def _node(module: str) -> str:
    """`sidecar.auth.verify` -> `auth`; `sidecar.upstreams.mcp.x` -> `upstreams`; `sidecar.app` -> `app`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name == "sidecar" or name.startswith("sidecar.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        src = _node(module)
        edges = graph.setdefault(src, set())
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for target in _runtime_imports(tree, module, path.name == "__init__.py"):
            if target == "sidecar":
                continue
            dst = _node(target)
            if dst != src and ((PACKAGE / dst).is_dir() or (PACKAGE / f"{dst}.py").exists()):
                edges.add(dst)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_module_over_limit() -> None:
    too_long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_no_cycle_between_subpackages() -> None:
    graph = package_graph()
    unexplained = []
    for component in _cycles(graph):
        pairs = {frozenset((a, b)) for a in component for b in graph[a] if b in component}
        if not pairs <= set(ALLOWED_CYCLES):
            unexplained.append(component)
    assert not unexplained, f"import cycles between subpackages: {unexplained}"


def test_graph_sees_the_package() -> None:
    graph = package_graph()
    assert {"config", "http", "auth", "store", "limits", "cache", "upstreams"} <= set(graph)
    assert "config" in graph["app"]


# Modules that may import sidecar.app: the entry points, the package root's re-exports, and the workers
# (which run whole applications). Everything else reads the application through a narrow protocol
# (http/host.py, admin/api.py, upstreams/mcp/host.py, oauth/host.py, console/host.py).
APP_IMPORTERS = {"sidecar", "sidecar.app", "sidecar.cli", "sidecar.demo", "sidecar.__main__"}


def _all_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every sidecar module a file names in an import, ``if TYPE_CHECKING:`` ones included."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def test_only_entry_points_and_workers_import_the_application() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if module in APP_IMPORTERS or module.startswith("sidecar.workers"):
            continue
        names = _all_imports(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py")
        if "sidecar.app" in names or any(n.startswith("sidecar.app.") for n in names):
            offenders.append(module)
    assert not offenders, f"modules that import sidecar.app (use a narrow host protocol instead): {offenders}"
