"""The core/shell boundary of docs/architecture.md, checked on the source itself.

`edge/core/` is sans-I/O: nothing under it may import the I/O libraries or the
shell, and the package graph has no cycle. The walk reads every module's
`import` statements with `ast` (including imports inside functions), so a
lazy import cannot slip past it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edge

PACKAGE = Path(edge.__file__).parent
FORBIDDEN = ("trio", "socket", "OpenSSL.SSL", "prometheus_client", "h11", "httpx", "dns")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from OpenSSL import SSL` imports OpenSSL.SSL.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_core_imports_no_io_library_and_no_shell_module() -> None:
    graph = _graph()
    core = {m: imps for m, imps in graph.items() if _is(m, "edge.core")}
    assert len(core) >= 7, sorted(core)
    offences = []
    for module, imports in core.items():
        for name in imports:
            if any(_is(name, bad) for bad in FORBIDDEN):
                offences.append(f"{module} imports {name}")
            if _is(name, "edge") and not _is(name, "edge.core") and name != "edge":
                offences.append(f"{module} imports the shell module {name}")
    assert offences == []


def test_no_import_cycle_between_edge_modules() -> None:
    graph = _graph()
    modules = set(graph) - {"edge", "edge.core"}
    edges = {m: {n for n in imps if n in modules and n != m} for m, imps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend([*path, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for start in sorted(edges):
        if state.get(start) is None and visit(start, []):
            break
    assert cycle == []


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from OpenSSL import SSL\n    import trio.lowlevel\n")
    found = _imports(sample)
    assert "OpenSSL.SSL" in found
    assert any(_is(n, "trio") for n in found)
