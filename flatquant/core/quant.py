"""Fake quantizers (spec §1): integer grids, scales, straight-through rounding."""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import QuantSpec


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _grouped(x: Tensor, spec: QuantSpec) -> Tensor:
    """View the last dimension as (n // group_size, group_size) for per-group quantizers."""
    if spec.granularity != "per_group":
        return x
    g = spec.group_size
    assert g is not None
    if x.shape[-1] % g:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by group_size {g}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def qparams(
    x: Tensor,  # (..., n): statistics over the last dimension
    spec: QuantSpec,
    *,
    clip_lo: Tensor | None = None,  # broadcastable to (..., 1): factor in (0, 1) on the row minimum
    clip_hi: Tensor | None = None,  # broadcastable to (..., 1): factor in (0, 1) on the row maximum
) -> tuple[Tensor, Tensor]:
    """Scale and zero point per row of ``x`` (the range always includes 0).

    Symmetric: ``s = max(|min|, max) / qmax`` with ``s = 1`` for all-zero rows, ``z = 0``.
    Asymmetric: ``s = (max - min) / qmax`` with rows whose range is 0 mapped to (-1, 1),
    ``z = round(-min / s)``. The scale stays differentiable (no detach), as LWC needs.

    Returns:
        ``(scale, zero)``, each of shape ``(..., 1)``.
    """
    xmax = torch.clamp(x.amax(dim=-1, keepdim=True), min=0)
    xmin = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    if clip_hi is not None:
        xmax = xmax * clip_hi
    if clip_lo is not None:
        xmin = xmin * clip_lo
    if spec.sym:
        amax = torch.maximum(-xmin, xmax)
        scale = torch.where(amax > 0, amax / spec.qmax, torch.ones_like(amax))
        return scale, torch.zeros_like(scale)
    empty = (xmax - xmin) <= 0
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / spec.qmax
    zero = torch.round(-xmin / scale).detach()
    return scale, zero


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes ``clamp(round(x / s) + z, qmin, qmax)`` (no gradient), as float tensors."""
    return torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)


def fake_quant_with(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize then dequantize with given parameters; straight-through rounding."""
    q = torch.clamp(round_ste(x / scale) + zero, spec.qmin, spec.qmax)
    return (q - zero) * scale


def fake_quant(
    x: Tensor,  # (..., n)
    spec: QuantSpec,
    *,
    clip_lo: Tensor | None = None,
    clip_hi: Tensor | None = None,
) -> Tensor:
    """Fake-quantize ``x`` row-wise over its last dimension (or its groups); identity if disabled."""
    if not spec.enabled:
        return x
    xg = _grouped(x, spec)
    if spec.granularity == "per_group" and clip_lo is not None:
        clip_lo = clip_lo.unsqueeze(-1)
        clip_hi = clip_hi.unsqueeze(-1) if clip_hi is not None else None
    scale, zero = qparams(xg, spec, clip_lo=clip_lo, clip_hi=clip_hi)
    return fake_quant_with(xg, scale, zero, spec).reshape(x.shape)


def quantize(
    x: Tensor,  # (..., n)
    spec: QuantSpec,
    *,
    clip_lo: Tensor | None = None,
    clip_hi: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes (int8), scales and zero points of ``x``; the real path's reference.

    Returns:
        ``codes`` with the shape of ``x`` (int8 symmetric / uint8 asymmetric up to 8 bits), ``scale`` and ``zero``
        of shape ``(..., 1)``
        (per group: ``(..., n // group_size, 1)``).
    """
    if not spec.enabled:
        raise ValueError("quantize() needs bits < 16")
    xg = _grouped(x, spec)
    scale, zero = qparams(xg, spec, clip_lo=clip_lo, clip_hi=clip_hi)
    codes = quantize_codes(xg, scale, zero, spec)
    dtype = (torch.int8 if spec.sym else torch.uint8) if spec.bits <= 8 else torch.int32
    return codes.to(dtype).reshape(x.shape), scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Inverse of :func:`quantize`: ``(codes - zero) * scale`` in the scale's dtype."""
    cg = _grouped(codes.to(scale.dtype), spec)
    return ((cg - zero) * scale).reshape(codes.shape)
