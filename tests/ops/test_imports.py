"""The ops modules import each other without cycles (gemv and matmul share flatquant.ops._modes)."""

from __future__ import annotations

import ast
from pathlib import Path

import flatquant.ops

OPS = Path(flatquant.ops.__file__).parent


def _local_imports(path: Path) -> dict[str, set[str]]:
    """``{importing function or '<module>': {sibling module names}}`` for the relative imports of ``path``."""
    out: dict[str, set[str]] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
            elif isinstance(child, ast.ImportFrom) and child.level == 1:
                mods = {child.module} if child.module else {a.name for a in child.names}
                out.setdefault(scope, set()).update(mods)
            else:
                visit(child, scope)

    visit(ast.parse(path.read_text()), "<module>")
    return out


def test_no_import_cycle_between_ops_modules() -> None:
    graph = {p.stem: set().union(*_local_imports(p).values()) for p in OPS.glob("*.py") if p.stem != "__init__"}
    assert "matmul" not in graph["gemv"] and "_modes" in graph["gemv"] and "_modes" in graph["matmul"]

    def reaches(src: str, dst: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(m == dst or (m in graph and m not in seen and reaches(m, dst, seen | {m})) for m in graph[src])

    cycles = [m for m in graph if reaches(m, m)]
    assert cycles == []


def test_no_function_level_imports_between_gemv_and_matmul() -> None:
    for name, other in (("matmul", "gemv"), ("gemv", "matmul")):
        scopes = _local_imports(OPS / f"{name}.py")
        assert not any(other in mods for scope, mods in scopes.items() if scope != "<module>")
