"""What is checked of how tierproxy's modules import each other, exactly:

* no import cycles among tierproxy's modules (a cycle through a package's ``__init__`` too);
* the admin listener (``tierproxy.admin``) does not reach the proxy app - ``server``,
  ``handler``, ``hits``, ``cli`` - directly or through other modules (it reads the proxy's
  state from ``tierproxy.state``);
* the entry points are imported only from above: ``tierproxy.server`` (the composition root)
  only by ``cli``, and ``cli`` only by ``__main__``.

No full layer table is checked (docs/ARCHITECTURE.md draws the layers; a few imports cross
them, e.g. ``tiers.base`` uses ``policy``).

The graph is read from the source (ast), so imports made only for type checking count too: a
cycle there is still two modules that each need the other to be understood.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tierproxy"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tierproxy modules ``name`` imports (``from . import x``: the module x, not the
    package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), or a module
    importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    for _ in range(len(graph) + 1):  # bounded: each round adds at least one module or ends
        if not todo:
            break
        current = todo.pop()
        for child in graph[current] - seen:
            seen.add(child)
            todo.append(child)
    return seen


def test_the_graph_is_read_from_every_module() -> None:
    graph = import_graph()
    assert "tierproxy.server" in graph and "tierproxy.tiers.base" in graph
    assert "tierproxy.state" in graph["tierproxy.admin"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_tierproxy() -> None:
    assert cycles(import_graph()) == []


def test_the_admin_listener_does_not_import_the_proxy_app() -> None:
    below_admin = _reachable(import_graph(), "tierproxy.admin")
    assert not below_admin & {
        "tierproxy.server",
        "tierproxy.handler",
        "tierproxy.hits",
        "tierproxy.cli",
    }, sorted(below_admin)


def test_the_entry_points_are_imported_only_from_above() -> None:
    graph = import_graph()
    importers = {
        target: sorted(name for name, imports in graph.items() if target in imports)
        for target in ("tierproxy.server", "tierproxy.cli")
    }
    assert importers == {
        "tierproxy.server": ["tierproxy.cli"],
        "tierproxy.cli": ["tierproxy.__main__"],
    }
