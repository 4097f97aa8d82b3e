"""What the integer GEMMs of :mod:`flatquant.ops.matmul` and :mod:`flatquant.ops.gemv` share: the operand modes
and the operand checks. Both kernels' modules import this one, so neither imports the other for them."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref

# Operand modes (the kernels' ``MODE`` constexpr): int8 x int8, packed int4 x packed int4, int8 x halves int4.
MODE_W8A8, MODE_W4A4, MODE_W4A8 = 0, 1, 2


def halves_cols(k: int) -> int:
    """Byte columns of a W4A8 ``halves``-layout weight for ``K = k`` (K padded to ``W4A8_BLOCK_K``)."""
    return -(-k // ref.W4A8_BLOCK_K) * ref.W4A8_BLOCK_K // 2


def check_operands(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, k: int, kw: int) -> None:
    """Raise ValueError unless ``a`` / ``w`` are 2-D, ``w`` has ``kw`` columns and the scales are ``(M,)`` /
    ``(N,)``."""
    if a.dim() != 2 or w.dim() != 2:
        raise ValueError(f"a and w must be 2-D, got {tuple(a.shape)} and {tuple(w.shape)}")
    if w.shape[1] != kw:
        raise ValueError(f"weight has {w.shape[1]} columns, expected {kw} for K={k}")
    if a_scale.shape != (a.shape[0],) or w_scale.shape != (w.shape[0],):
        raise ValueError("a_scale must be (M,) and w_scale (N,)")


def check_residual(residual: Tensor | None, m: int, n: int, out_dtype: torch.dtype) -> None:
    """Raise ValueError unless ``residual`` is None or ``(m, n)`` in ``out_dtype`` (an epilogue's residual add)."""
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.dtype != out_dtype):
        raise ValueError(f"residual must be ({m}, {n}) {out_dtype}, got {tuple(residual.shape)} {residual.dtype}")
