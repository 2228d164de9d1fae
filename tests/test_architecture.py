"""The shape of the code: who may talk to the database, and no import cycles inside server/.

Both are read from the source with :mod:`ast` (every import counts: module level, inside
functions, and under ``if TYPE_CHECKING``), so a cycle cannot hide in a function body.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("protocol", "mqttlink", "edge", "server", "firmware_sim", "provisioning",
           "alarmpost_cli", "bench")
DRIVERS = {"sqlite3", "sqlite_utils", "psycopg", "psycopg_pool", "asyncpg"}
# The only modules that may speak to a database: the server's storage package, and the edge's
# own storage (the post's durable outbox in a SQLite file, a separate program on the post).
STORAGE = ("server/storage/", "edge/storage.py", "edge/outbox.py")


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_only_the_storage_packages_import_a_database_driver() -> None:
    offenders = []
    for package in PRODUCT:
        for path in modules(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(STORAGE):
                continue
            used = {name.split(".")[0] for name in imports(path)} & DRIVERS
            if used:
                offenders.append(f"{rel}: {', '.join(sorted(used))}")
    assert not offenders, "database drivers outside the storage package:\n" + "\n".join(offenders)


def import_graph(package: str) -> dict[str, set[str]]:
    paths = {module_name(p): p for p in modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for imported in imports(path):
            # ``from server.storage import Committed``: the module is server.storage.
            while imported and imported not in paths:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_inside_server() -> None:
    found = cycles(import_graph("server"))
    assert not found, "import cycles inside server/:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_sees_a_cycle_in_a_function_body(tmp_path: Path) -> None:
    graph = {"server.a": {"server.b"}, "server.b": {"server.a"}, "server.c": {"server.a"}}
    assert cycles(graph) == [["server.a", "server.b"]]
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from server.app import CentralServer\n")
    assert "server.app" in imports(source)


def test_edge_and_server_never_import_each_other() -> None:
    for package, other in (("edge", "server"), ("server", "edge"), ("protocol", "edge"),
                           ("protocol", "server"), ("mqttlink", "server"), ("mqttlink", "edge")):
        for path in modules(package):
            bad = {n for n in imports(path) if n == other or n.startswith(other + ".")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
