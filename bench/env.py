"""Environment record shared by the benchmarks: GPU, versions, command."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path


def _version(dist: str) -> str:
    """Installed version of a distribution without importing it ("none" when absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def environment() -> dict[str, str]:
    """GPU name, library versions, host and the exact command line."""
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    try:
        import transformers

        hv = transformers.__version__
    except ImportError:
        hv = "none"
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "none (CPU)",
        "gpu_count": str(torch.cuda.device_count() if cuda else 0),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": tv,
        "transformers": hv,
        # read from the installed metadata: importing torchao has side effects (kernel library loading, warnings)
        "torchao": _version("torchao"),
        "python": platform.python_version(),
        "host_cpus": str(os.cpu_count()),
        "command": shlex.join(["python"] + sys.argv),
        "cwd": os.getcwd(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: Path | None, result: dict) -> None:
    """Write a benchmark's result as indented JSON (creating the folder); nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")  # atomic: a run killed mid-write keeps the previous JSON
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)
