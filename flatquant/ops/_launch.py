"""Launch helpers: native Triton on CUDA, Triton's interpreter on CPU tensors (for tests of the kernels)."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from collections.abc import Iterator
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl


def next_pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two ``>= max(n, floor)`` (``tl.dot`` needs tile sides of at least 16)."""
    return max(floor, triton.next_power_of_2(n))


def _raw_fn(kernel: Any) -> Any:
    """The plain Python function under ``triton.jit`` / ``autotune`` / ``heuristics`` wrappers."""
    k = kernel
    while not inspect.isfunction(k):
        k = k.fn
    return k


@cache
def _interpreted(fn: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _interpret_nested_jit() -> Iterator[None]:
    """Let ``@triton.jit`` helpers called from an interpreted kernel (``tl.max``, ``tl.sum``, …) run interpreted.

    Without ``TRITON_INTERPRET=1`` at triton's import, those helpers are compiled-mode ``JITFunction`` objects whose
    ``__call__`` raises; during a CPU launch they are routed to the interpreter instead. Nothing changes on CUDA.
    """
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    def nested(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Like InterpretedFunction.__call__, but undo the language patching afterwards, so that later native
        # (CUDA) compilations in the same process see an untouched triton.language.
        scope = _patch_lang(self.fn)
        try:
            return _interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            if scope is not None:
                scope.restore()

    with _PATCH_LOCK:
        original = JITFunction.__call__
        JITFunction.__call__ = nested  # type: ignore[method-assign]
        try:
            yield
        finally:
            JITFunction.__call__ = original  # type: ignore[method-assign]


class _CpuLauncher:
    """``kernel[grid](...)`` through Triton's interpreter."""

    def __init__(self, fn: Any) -> None:
        self._fn = _interpreted(fn)

    def __getitem__(self, grid: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with _interpret_nested_jit():
                return self._fn[grid](*args, **kwargs)

        return run


def cpu_kernel(kernel: Any) -> Any:
    """The interpreter version of ``kernel``, independent of ``TRITON_INTERPRET`` and of import order.

    On CPU tensors the Triton launchers run through this, so tests exercise the kernel code itself.
    """
    return _CpuLauncher(_raw_fn(kernel))


_CPU_SMS = 4
"""Stand-in SM count on CPU tensors (the interpreter runs programs one after another)."""


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM, cached per device); a stand-in on CPU."""
    if device.type != "cuda":
        return _CPU_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _pdl_capable(index: int) -> bool:
    from triton.language.extra import cuda as tl_cuda

    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl_cuda, "gdc_wait")


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (PDL).

    True on Hopper or newer CUDA devices with a Triton that has grid-dependency control, unless the environment
    sets ``FLATQUANT_PDL=0`` (read at each launch, for side-by-side measurements). A PDL kernel may start while the
    kernel before it drains; every such kernel calls :func:`pdl_wait` before it touches anything that earlier
    kernels write (and before any store), so the results are the same either way.
    """
    if device.type != "cuda" or os.environ.get("FLATQUANT_PDL", "1") == "0":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


PDL_MAX_ROWS = 8
"""Launches over at most this many token rows use PDL (decode at small batch). On the H200 PDL took a batch-1
decode step from 3.41 to 3.23 ms, but made batch-16 decode (4.76 -> 4.78-4.92 ms) and 2048-token prefills (42.2 ->
43.1 ms) slower (``bench/results/engine_launch_ab_h200.json``)."""


def launch_options(device: torch.device, rows: int, **options: Any) -> dict[str, Any]:
    """Keyword arguments for launching a kernel that takes a ``PDL`` constexpr (and calls :func:`pdl_wait`) over
    ``rows`` token rows: ``PDL`` itself, plus on CUDA the launch ``options`` and ``launch_pdl`` where
    :func:`pdl_enabled` and ``rows <= PDL_MAX_ROWS``; on CPU (the interpreter) ``PDL=False`` alone."""
    if device.type != "cuda":
        return {"PDL": False}
    pdl = rows <= PDL_MAX_ROWS and pdl_enabled(device)
    return {**options, "PDL": pdl, **({"launch_pdl": True} if pdl else {})}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With ``PDL``: wait until the previous kernel has finished and its writes are visible, then let the next
    kernel start launching. Everything a PDL kernel does before this may read only constant inputs (weights) and
    must write nothing."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def on_cpu(t: torch.Tensor) -> bool:
    """True when ``t`` lives on the CPU (the launcher then uses the interpreter)."""
    return t.device.type == "cpu"


@triton.jit
def round_to_bf16_f32(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32, from the bits.

    Used only under the interpreter, whose fp32 -> bf16 cast truncates; after this a cast is exact.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def nibble_lo(b):
    """Sign-extended low nibbles of int8 bytes, as int8 (shift left into the top, arithmetic shift back)."""
    return ((b << 4).to(tl.int8) >> 4).to(tl.int8)


@triton.jit
def nibble_hi(b):
    """Sign-extended high nibbles of int8 bytes, as int8 (arithmetic shift)."""
    return (b >> 4).to(tl.int8)


@triton.jit
def dequant_epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm,
                     HAS_BIAS: tl.constexpr, INTERPRET_BF16: tl.constexpr, res_ptr, HAS_RES: tl.constexpr):
    """Integer-GEMM epilogue: ``(acc · s_a[m]) · s_w[n] (+ bias[n])`` in fp32, cast once to ``c``'s dtype and
    stored with edge masks; ``acc`` is the ``(BLOCK_M, BLOCK_N)`` int32 tile at rows ``offs_m``, columns ``offs_n``.
    ``HAS_RES``: the residual at ``res_ptr`` (``c``'s dtype and strides) is added to the cast result in fp32 and the
    sum cast again, as eager PyTorch adds two tensors of that dtype (a decode layer's residual stream)."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if INTERPRET_BF16:
        out = round_to_bf16_f32(out)
    offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        out = out.to(c_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + offs, mask=mask, other=0.0).to(
            tl.float32)
        if INTERPRET_BF16:
            out = round_to_bf16_f32(out)
    tl.store(c_ptr + offs, out.to(c_ptr.dtype.element_ty), mask=mask)
