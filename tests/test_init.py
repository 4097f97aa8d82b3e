"""The top-level namespace: lazy re-exports of the public API, light to import, and what the README uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import flatquant


def test_every_export_resolves_to_its_module_object():
    import flatquant.api
    import flatquant.models.hf

    assert flatquant.quantize_model is flatquant.api.quantize_model
    assert flatquant.load_model is flatquant.models.hf.load
    for name in flatquant.__all__:
        assert getattr(flatquant, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        flatquant.nope  # noqa: B018


def test_import_is_light():
    code = "import sys, flatquant; print(sorted(m for m in ('triton', 'flatquant.ops', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_library_example_uses_only_exported_names():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "import flatquant as fq" in block and "from flatquant" not in block
    used = set(re.findall(r"\bfq\.(\w+)", block))
    assert used and used <= set(flatquant.__all__), used - set(flatquant.__all__)
