"""Quantized linear layer on top of the ops, with a ``fake`` / ``real`` backend switch.

``real`` runs the fused online transform + LAC + quantize op and an integer GEMM; ``fake`` computes the same
function with :mod:`flatquant.core` fake quantization in floating point. Both are plain functions of a frozen
:class:`QLinearParams`, so they work from functional model code and under ``torch.compile(fullgraph=True)``
(every op has a fake kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flatquant.core.kron import head_mix, head_transform, kron_transform
from flatquant.core.quant import fake_quant, quantize
from flatquant.core.spec import QuantSpec

from . import reference as ref
from .kron_quant import kron_quant
from .matmul import w4a4_matmul, w4a8_matmul, w8a8_matmul
from .pack import int4_halves_layout, pack_int4, unpack_int4

Backend = Literal["fake", "real"]


KERNEL_BIT_PAIRS: tuple[tuple[int, int], ...] = ((4, 4), (8, 4), (8, 8))
"""``(activation bits, weight bits)`` the integer GEMMs implement (W4A4, W4A8, W8A8)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QLinearParams:
    """Everything a quantized linear needs at inference (weights already folded and quantized).

    Attributes:
        weight: ``(N, K/2)`` uint8 interleaved int4 codes (``w_bits=4``) or ``(N, K)`` int8 (``w_bits=8``).
        weight_halves: ``(N, Kp/2)`` uint8 ``halves`` layout for the W4A8 kernel, or None.
        w_scale: ``(N,)`` fp32 per-output-channel scales.
        bias: ``(N,)`` or None.
        left / right: online transform factors ``(n1, n1)`` / ``(n2, n2)`` (None = identity); ``left`` alone with
            ``n1 = heads`` is o_proj head mixing.
        n1: left factor size (``K = n1 * n2``).
        clip: ``(2,)`` fp32 LAC factors ``[σ(lo), σ(hi)]`` of this linear's activation quantizer.
        a_bits / w_bits: 4 or 8.
    """

    weight: Tensor
    w_scale: Tensor
    bias: Tensor | None = None
    weight_halves: Tensor | None = None
    left: Tensor | None = None
    right: Tensor | None = None
    n1: int = 1
    clip: Tensor
    a_bits: int = 4
    w_bits: int = 4

    def __post_init__(self) -> None:
        if (self.a_bits, self.w_bits) not in KERNEL_BIT_PAIRS:
            raise ValueError(f"supported (a_bits, w_bits): {KERNEL_BIT_PAIRS}; got {(self.a_bits, self.w_bits)}")
        if self.a_bits == 8 and self.w_bits == 4 and self.weight_halves is None:
            raise ValueError("W4A8 needs weight_halves (see make_qlinear)")

    @property
    def in_features(self) -> int:
        """K."""
        return self.weight.shape[1] * (2 if self.w_bits == 4 else 1)

    @property
    def out_features(self) -> int:
        """N."""
        return self.weight.shape[0]


def make_qlinear(
    weight: Tensor,  # (N, K) float, already transformed (W P^{-T}) and clipped (LWC)
    *,
    bias: Tensor | None = None,  # (N,)
    left: Tensor | None = None,  # (n1, n1)
    right: Tensor | None = None,  # (n2, n2)
    clip: Tensor | tuple[float, float] = (1.0, 1.0),
    a_bits: int = 4,
    w_bits: int = 4,
    dtype: torch.dtype = torch.bfloat16,
) -> QLinearParams:
    """Quantize a folded weight per output channel (symmetric RTN, core numerics) and pack it.

    Returns:
        :class:`QLinearParams` with transform factors and bias cast to ``dtype``.
    """
    codes, scale, _ = quantize(weight.float(), QuantSpec(bits=w_bits, sym=True, granularity="per_channel"))
    packed = pack_int4(codes) if w_bits == 4 else codes
    k = weight.shape[1]
    n1 = left.shape[0] if left is not None else (k // right.shape[0] if right is not None else 1)
    return QLinearParams(
        weight=packed, w_scale=scale.squeeze(-1), bias=None if bias is None else bias.to(dtype),
        weight_halves=int4_halves_layout(packed) if (a_bits, w_bits) == (8, 4) else None,
        left=None if left is None else left.to(dtype), right=None if right is None else right.to(dtype),
        n1=n1, clip=torch.as_tensor(clip, dtype=torch.float32, device=weight.device), a_bits=a_bits, w_bits=w_bits,
    )


def dequantized_weight(p: QLinearParams, dtype: torch.dtype) -> Tensor:  # (N, K)
    """``codes · s_w`` in ``dtype`` (the fake path's weight)."""
    codes = unpack_int4(p.weight) if p.w_bits == 4 else p.weight
    return (codes.float() * p.w_scale[:, None]).to(dtype)


def _transform(x: Tensor, p: QLinearParams) -> Tensor:
    if p.left is not None and p.right is not None:
        return kron_transform(x, p.left, p.right)
    if p.left is not None:
        return head_mix(x, p.left)
    if p.right is not None:
        return head_transform(x, p.right)
    return x


def qlinear(
    x: Tensor,  # (..., K) fp16/bf16
    p: QLinearParams,
    backend: Backend = "real",
) -> Tensor:  # (..., N)
    """Online transform -> LAC -> per-token activation quantization -> quantized GEMM (+ bias).

    ``fake`` follows core in ``x.dtype`` (transform and fake quant in floating point, dequantized weights);
    ``real`` runs the ``flatquant::`` ops (fp32 transform output, integer GEMM, fp32 epilogue). They agree within
    one activation quantization step per element of the transformed input.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    if backend == "fake":
        y = _transform(x, p)
        y = fake_quant(y, QuantSpec(bits=p.a_bits), clip_lo=p.clip[0].to(y.dtype), clip_hi=p.clip[1].to(y.dtype))
        return F.linear(y, dequantized_weight(p, x.dtype), p.bias)
    if backend != "real":
        raise ValueError(f"backend must be 'fake' or 'real', got {backend!r}")
    x2 = x.reshape(-1, k)
    pack = p.a_bits == 4
    codes, scale = kron_quant(x2, p.left, p.right, p.clip, p.n1, p.a_bits, pack)
    if p.a_bits == 4:
        out = w4a4_matmul(codes, scale, p.weight, p.w_scale, p.bias, x.dtype)
    elif p.w_bits == 4:
        assert p.weight_halves is not None
        out = w4a8_matmul(codes, scale, p.weight_halves, p.w_scale, p.bias, x.dtype)
    else:
        out = w8a8_matmul(codes, scale, p.weight, p.w_scale, p.bias, x.dtype)
    return out.reshape(*lead, p.out_features)


__all__ = ["KERNEL_BIT_PAIRS", "Backend", "QLinearParams", "dequantized_weight", "make_qlinear", "qlinear", "ref"]
