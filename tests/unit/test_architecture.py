"""The package's shape, read from the source with ``ast``: no import cycle between the watcher's
modules, a daemon small enough to read in one sitting, no class that does too many jobs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "watcher"
DAEMON_MAX_LINES = 350
MAX_METHODS = 25
# The store interface (one method per query) and the simulator (the API it imitates) are wide
# by nature; everything else splits before it reaches MAX_METHODS.
WIDE_BY_NATURE = ("watcher/store/", "watcher/simulator/")


def module_name(path: Path) -> str:
    """``watcher/store/__init__.py`` -> ``watcher.store``; ``watcher/cli.py`` -> ``watcher.cli``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _known(name: str) -> str | None:
    """The module ``name`` is, or lies in (``watcher.store.Claim`` -> ``watcher.store``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, *, is_package: bool = False) -> set[str]:
    """The watcher modules ``source`` imports, anywhere in it (a function's lazy import and a
    ``TYPE_CHECKING`` block count: each is a dependency a reader must follow)."""
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(_known(a.name) for a in node.names if a.name.startswith("watcher"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base == "watcher" or base.startswith("watcher."):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in MODULES else _known(base))
    found.discard(None)
    found.discard(module)
    return {name for name in found if name is not None}


def import_graph() -> dict[str, set[str]]:
    """Every watcher module and the watcher modules it imports."""
    return {
        name: imports_of(name, path.read_text("utf-8"), is_package=path.name == "__init__.py")
        for name, path in MODULES.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (each as the path that closes it), by depth-first search."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                found.append([*path[path.index(child) :], child])
            elif child not in state:
                visit(child)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check below can fail: two modules importing each other (as cli and demo once did,
    one of them lazily) are a cycle."""
    cli = "from watcher.daemon import Daemon\ndef f():\n    from watcher.demo import run_demo\n"
    demo = "from watcher.cli import render_table\n"
    graph = {
        "watcher.cli": imports_of("watcher.cli", cli),
        "watcher.demo": imports_of("watcher.demo", demo),
    }
    assert graph == {
        "watcher.cli": {"watcher.daemon", "watcher.demo"},
        "watcher.demo": {"watcher.cli"},
    }
    assert cycles(graph) == [["watcher.cli", "watcher.demo", "watcher.cli"]]


def test_no_import_cycle_between_watcher_modules() -> None:
    """Every module can be understood from the ones below it: no module imports, however
    indirectly, one that imports it."""
    graph = import_graph()
    assert "watcher.daemon" in graph["watcher.wiring"]  # the graph is really read
    assert cycles(graph) == []


def test_the_daemon_stays_small() -> None:
    """The lifecycle object stays readable in one sitting: the work lives in the dispatcher,
    the workflow, health and the wiring."""
    lines = len((PACKAGE / "daemon.py").read_text("utf-8").splitlines())
    assert lines <= DAEMON_MAX_LINES


def test_no_class_does_too_many_jobs() -> None:
    """No class outside the store and the simulator has more than 25 methods."""
    wide: list[tuple[str, str, int]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        if where.startswith(WIDE_BY_NATURE):
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ClassDef):
                methods = [
                    b for b in node.body if isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)
                ]
                if len(methods) > MAX_METHODS:
                    wide.append((where, node.name, len(methods)))
    assert wide == []
