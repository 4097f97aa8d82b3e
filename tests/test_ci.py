"""The CI entry point runs exactly the README's test command, and that command lints."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^Tests\b[^\n]*:\n\n```bash\n(.+?)\n```", text, re.M | re.S)
    assert m, "README.md has no 'Tests:' bash block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    cmd = _readme_test_command()
    lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    body = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]
    assert body == [cmd]
    assert "ruff check ." in cmd and "python3 -m mypy" in cmd and "pytest" in cmd


def test_setup_installs_the_linter():
    pyproject = (ROOT / "pyproject.toml").read_text()
    test_extra = re.search(r"^test = \[(.*)\]$", pyproject, re.M)
    assert test_extra and '"ruff' in test_extra.group(1) and '"mypy' in test_extra.group(1)
    assert ".[test" in (ROOT / "scripts/setup.sh").read_text()


def _private_flatquant_imports(source: str) -> list[str]:
    """``lineno name`` for each import of a ``flatquant`` module or name whose dotted path has a ``_x`` part."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flatquant"):
            paths = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            paths = [a.name for a in node.names if a.name.startswith("flatquant")]
        else:
            continue
        found += [f"{node.lineno} {p}" for p in paths if any(part.startswith("_") for part in p.split("."))]
    return found


def test_bench_imports_only_public_flatquant_names():
    """bench/ is a client of the package: no ``flatquant._x`` module and no ``_x`` name."""
    bad = "from flatquant.ops._launch import sm_count"
    assert _private_flatquant_imports(bad) == ["1 flatquant.ops._launch.sm_count"]
    private = [f"{p.name}:{hit}" for p in sorted((ROOT / "bench").glob("*.py"))
               for hit in _private_flatquant_imports(p.read_text())]
    assert private == []
