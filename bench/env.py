"""Environment record shared by the benchmarks: GPU, versions, command."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from importlib import metadata


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
