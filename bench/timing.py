"""Timing helpers shared by the GPU benchmarks: CUDA-graph replay timing, L2-defeating operand copies, and the
device's copy bandwidth (the memory floor)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from triton.testing import do_bench_cudagraph

L2_BYTES = 50 * 2**20  # H100 L2 (50 MB); operands are rotated through 3x this


def graph_time(fn: Callable[[], object], calls: int = 1, rep: int = 20) -> float:
    """Median µs per call of ``fn`` (which makes ``calls`` calls), replayed from a CUDA graph.

    Graph replay removes host launch overhead for every method alike (as ``torch.compile(mode="reduce-overhead")``
    would in a model); autotuning and compilation happen in the eager warm-up call before capture.
    """
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3 / calls


def rotating(make: Callable[[], torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    """Enough copies of an operand of ``nbytes`` that cycling through them defeats the L2 cache."""
    return [make() for _ in range(max(1, min(8, math.ceil(3 * L2_BYTES / max(nbytes, 1)))))]


def time_all(fns: list[Callable[[], object]], rep: int = 20) -> float:
    """Median µs per call over the rotated copies (one graph runs them all)."""

    def run() -> None:
        for f in fns:
            f()

    return graph_time(run, len(fns), rep)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write)."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (graph_time(lambda: b.copy_(a)) * 1e-6)
