"""CUDA-graph capture of one calibration step (gradient + AdamW), replayed for every later step.

A calibration step of a small layer is bound by kernel launches (thousands of small kernels, a few
milliseconds of GPU work): replaying a captured graph removes the launch cost. The step must be a
pure function of tensors of fixed shapes: ``step(params, m, v, x, y, scalars) -> (params, m, v, mse)``.

Capture is verified before use: the first replay must reproduce an eager step; otherwise (or if
capture fails) the caller keeps stepping eagerly.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
Step = Callable[[Params, Params, Params, Tensor, Tensor, Tensor], tuple[Params, Params, Params, Tensor]]


@contextlib.contextmanager
def capturable_linalg(device: torch.device) -> Iterator[None]:
    """Route CUDA LU factorisations (the Cayley maps) to cuSOLVER/cuBLAS for the duration, then restore the setting.

    PyTorch's default heuristic sends batched LU of matrices above 16×16 to MAGMA, whose host-side
    control flow is not known to be capture-safe; the cuSOLVER/cuBLAS paths are stream-ordered. (The
    host sync that did break capture on the H100 was ``linalg.solve``'s backward; see ``core.affine.cayley``.)
    """
    if device.type != "cuda":
        yield
        return
    prev = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(prev)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the duration (when ``enabled``), then restore the setting.

    It also sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` if it is unset (PyTorch refuses cuBLAS calls in
    deterministic mode without it) and leaves it set: cuBLAS reads it when it creates a workspace, not per call.
    An op with no deterministic implementation raises instead of running nondeterministically.
    """
    if not enabled:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


class CapturedStep:
    """A captured step whose parameters and optimizer state live in static buffers.

    ``run(x, y, scalars)`` copies the batch into the static inputs, replays the graph (which updates
    the static parameters and moments in place) and returns the static MSE tensor, valid until the
    next ``run``.
    """

    def __init__(self, step: Step, params: Params, m: Params, v: Params, x: Tensor, y: Tensor, scalars: Tensor,
                 *, warmup: int = 2) -> None:
        self.params = {k: t.clone() for k, t in params.items()}
        self.m = {k: t.clone() for k, t in m.items()}
        self.v = {k: t.clone() for k, t in v.items()}
        self.x, self.y, self.scalars = x.clone(), y.clone(), scalars.clone()
        torch.cuda.empty_cache()  # the graph's private pool cannot reuse blocks cached by the eager step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # lets lazy initialisation (cuBLAS handles, autotuning) happen outside capture
                step(self.params, self.m, self.v, self.x, self.y, self.scalars)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            p, m2, v2, mse = step(self.params, self.m, self.v, self.x, self.y, self.scalars)
            for dst, src in ((self.params, p), (self.m, m2), (self.v, v2)):
                for k in dst:
                    dst[k].copy_(src[k])
            self.mse = mse

    def load(self, params: Params, m: Params, v: Params) -> None:
        """Overwrite the static parameters and moments."""
        for dst, src in ((self.params, params), (self.m, m), (self.v, v)):
            for k in dst:
                dst[k].copy_(src[k])

    def run(self, x: Tensor, y: Tensor, scalars: Tensor) -> Tensor:
        """One optimizer step on batch ``(x, y)``; returns the (static) MSE before the update."""
        self.x.copy_(x)
        self.y.copy_(y)
        self.scalars.copy_(scalars)
        self.graph.replay()
        return self.mse


def _close(a: Params, b: Params, ref: Params, rtol: float) -> bool:
    """Whether ``a`` and ``b`` agree to ``rtol`` of the update size ``|b - ref|`` (plus a tiny floor)."""
    for k in a:
        upd = (b[k] - ref[k]).abs().max()
        if (a[k] - b[k]).abs().max() > rtol * upd + 1e-7 * b[k].abs().max() + 1e-12:
            return False
    return True


def try_capture(
    step: Step, before: tuple[Params, Params, Params], after: tuple[Params, Params, Params],
    x: Tensor, y: Tensor, scalars: Tensor, *, rtol: float = 1e-2,
) -> CapturedStep | None:
    """Capture ``step`` and check that replaying it from ``before`` gives the eager result ``after``.

    On success the captured step holds ``after`` (so the trajectory continues exactly from the eager
    step); on failure it returns ``None`` and logs why.
    """
    try:
        cap = CapturedStep(step, *before, x, y, scalars)  # statics hold ``before``: capture runs no kernels
        cap.run(x, y, scalars)
        torch.cuda.synchronize()
    except RuntimeError as err:  # capture refused an op (or ran out of memory): step eagerly
        log.warning("CUDA-graph capture of the calibration step failed (%s); stepping eagerly",
                    str(err).splitlines()[0])
        with contextlib.suppress(RuntimeError):  # a sticky CUDA error would re-raise here
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return None
    if not all(_close(c, a, b, rtol) for c, a, b in zip((cap.params, cap.m, cap.v), after, before)):
        log.warning("captured calibration step differs from the eager step; stepping eagerly")
        return None
    cap.load(*after)
    log.info("calibration step captured as a CUDA graph")
    return cap
