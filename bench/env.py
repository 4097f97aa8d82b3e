"""Environment record shared by the benchmarks: GPU, versions, command."""

from __future__ import annotations

import platform
import sys
import time


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
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "torch": torch.__version__,
        "triton": tv,
        "transformers": hv,
        "python": platform.python_version(),
        "host_cpus": str(__import__("os").cpu_count()),
        "command": " ".join(["python"] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
