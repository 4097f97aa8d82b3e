"""The CI entry point runs exactly the README's test command, and that command lints."""

from __future__ import annotations

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
    assert "ruff check ." in cmd and "pytest" in cmd


def test_setup_installs_the_linter():
    pyproject = (ROOT / "pyproject.toml").read_text()
    test_extra = re.search(r"^test = \[(.*)\]$", pyproject, re.M)
    assert test_extra and '"ruff' in test_extra.group(1)
    assert ".[test" in (ROOT / "scripts/setup.sh").read_text()
