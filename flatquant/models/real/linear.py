"""The linears of the real engine: integer W4A4/W4A8/W8A8 (one site fused), the fake fallback."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.kron import head_mix, kron_transform
from ...core.quant import fake_quant
from ...core.spec import QuantSpec
from ...ops import kron_quant, kron_quant_multi, pack_int4, unpack_int4, w4a4_gemv, w4a4_matmul, w8a8_matmul
from ...ops import reference as ref
from ...ops.gemv import counter_slots
from ...ops.matmul import GEMV_MAX_M, UNPACK_MIN_M
from ...ops.qlinear import QLinearParams, qlinear
from ..layer import swiglu


@dataclass(frozen=True, kw_only=True)
class FakeLinear:
    """Fallback linear: online transform, fake activation quantization, dequantized weight (the fake path)."""

    weight: Tensor  # (N, K) compute dtype
    bias: Tensor | None
    clip: Tensor  # (2,) fp32
    spec: QuantSpec
    left: Tensor | None = None  # (n1, n1)
    right: Tensor | None = None  # (n2, n2)

    def __call__(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        """The fake-quantized linear of ``x``."""
        if self.left is not None and self.right is not None:
            x = kron_transform(x, self.left, self.right)
        elif self.left is not None:
            x = head_mix(x, self.left)
        if self.spec.enabled:
            x = fake_quant(x, self.spec, clip_lo=self.clip[0], clip_hi=self.clip[1])
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True, kw_only=True)
class FusedQLinear:
    """W4A4 linears that share one online transform (q/k/v, gate/up), each with its own LAC pair.

    One ``flatquant::kron_quant_multi`` transforms the input once and writes one set of codes per linear. At up to
    ``GEMV_MAX_M`` rows in all (decode), one split-K GEMM runs over the concatenated weights with the code sets
    stacked as rows, and each linear keeps its own diagonal block (the extra rows are free: the MMA pads the token
    side to 16); with more rows, one GEMM per linear over its slice of the concatenated weights.
    """

    weight: Tensor  # (N_total, K/2) uint8, the linears' packed rows one after another
    w_scale: Tensor  # (N_total,) fp32
    bias: Tensor | None  # (N_total,) or None (zeros for linears without a bias when another has one)
    clips: Tensor  # (G, 2) fp32
    sizes: tuple[int, ...]  # output features of each linear
    left: Tensor | None = None  # (n1, n1)
    right: Tensor | None = None  # (n2, n2)
    n1: int = 1

    def __call__(self, x: Tensor, cpu_codes: Tensor | None = None, counters: Tensor | None = None,
                 norm: Tensor | None = None, eps: float = 0.0) -> list[Tensor]:  # (B, T, K) -> G x (B, T, N_g)
        """The outputs of the G linears (``cpu_codes`` / ``counters``: see :func:`gemm4`) on ``x``, or with ``norm``
        on ``rms_norm(x, norm, eps)``, formed in the transform kernel."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m, g = x2.shape[0], len(self.sizes)
        bounds = (0, *itertools.accumulate(self.sizes))
        if unpacked_prefill(x2, cpu_codes):
            codes8, scale = kron_quant_multi(x2, self.left, self.right, self.clips, self.n1, 4, False, norm, eps)
            w8 = unpack_int4(self.weight)  # once for the G linears
            return [w8a8_matmul(codes8[i], scale[i], w8[lo:hi], self.w_scale[lo:hi],
                                None if self.bias is None else self.bias[lo:hi], x.dtype).reshape(*lead, hi - lo)
                    for i, (lo, hi) in enumerate(itertools.pairwise(bounds))]
        # with cpu_codes the CPU product takes int8 codes: no pack here and unpack in gemm4
        codes, scale = kron_quant_multi(x2, self.left, self.right, self.clips, self.n1, 4, cpu_codes is None, norm,
                                        eps)
        if m * g <= GEMV_MAX_M:
            out = gemm4(codes.reshape(g * m, -1), scale.reshape(g * m), self.weight, self.w_scale, self.bias,
                        x.dtype, cpu_codes, counters).view(g, m, -1)
            return [out[i, :, bounds[i]:bounds[i + 1]].reshape(*lead, self.sizes[i]) for i in range(g)]
        outs = []
        for i in range(g):
            lo, hi = bounds[i], bounds[i + 1]
            bias = None if self.bias is None else self.bias[lo:hi]
            y = gemm4(codes[i], scale[i], self.weight[lo:hi], self.w_scale[lo:hi], bias, x.dtype,
                      None if cpu_codes is None else cpu_codes[lo:hi], counters)  # one stream: calls never overlap
            outs.append(y.reshape(*lead, hi - lo))
        return outs


def unpacked_prefill(x: Tensor, cpu_codes: Tensor | None) -> bool:  # x: (M, K)
    """Whether a W4A4 linear on ``M`` tokens takes int8 activation codes straight from the transform (CUDA, from
    ``UNPACK_MIN_M`` tokens): the GEMM there unpacks both operands to int8 for the W8A8 kernel anyway, so
    writing the activation codes unpacked saves a read-unpack-write pass over them (same codes, same result)."""
    return cpu_codes is None and x.is_cuda and x.shape[0] >= UNPACK_MIN_M


def gemm4(codes: Tensor, scale: Tensor, weight: Tensor, w_scale: Tensor, bias: Tensor | None, dtype: torch.dtype,
          cpu_codes: Tensor | None = None, counters: Tensor | None = None,
          residual: Tensor | None = None) -> Tensor:  # (M, K/2) codes -> (M, N)
    """W4A4 GEMM: ``flatquant::w4a4_matmul``; at up to ``GEMV_MAX_M`` rows with ``counters`` (the linear's own GEMV
    arrival counters, :func:`gemv_counters`) ``flatquant::w4a4_gemv``, which reduces its K split in-kernel; on CPU
    with ``cpu_codes`` ((N, K) int8 weight codes unpacked once at load) an exact int8 product
    (:func:`~flatquant.ops.reference.int8_mm_cpu`) and the same fp32 epilogue, without unpacking the weight on every
    call; ``codes`` may then be the unpacked ``(M, K)`` int8 codes. All give the reference's result. ``residual``
    ``(M, N)`` is added to the result (in the GEMV's epilogue, else as a separate add; the same bits)."""
    if cpu_codes is None:
        if counters is not None and codes.shape[0] <= GEMV_MAX_M:
            return w4a4_gemv(codes, scale, weight, w_scale, bias, dtype, counters, residual)
        out = w4a4_matmul(codes, scale, weight, w_scale, bias, dtype)
    else:
        acc = ref.int8_mm_cpu(codes if codes.dtype == torch.int8 else ref.unpack_int4_ref(codes), cpu_codes)
        out = ref.dequant_epilogue_ref(acc, scale, w_scale, bias, dtype)
    return out if residual is None else out + residual


def gemv_counters(out_features: int, device: torch.device) -> Tensor | None:
    """Zeroed GEMV arrival counters for a W4A4 linear with ``out_features`` outputs on ``device`` (CUDA; None
    elsewhere): enough for any decode call (up to ``GEMV_MAX_M`` rows). Every call leaves them at zero."""
    if device.type != "cuda":
        return None
    return torch.zeros(counter_slots(out_features, device, GEMV_MAX_M), dtype=torch.int32, device=device)


def fuse_linears(lins: list[QLinearParams]) -> FusedQLinear | None:
    """One :class:`FusedQLinear` for W4A4 linears with the same online transform, else None."""
    first = lins[0]
    if any(p.a_bits != 4 or p.w_bits != 4 or p.left is not first.left or p.right is not first.right
           or p.n1 != first.n1 for p in lins):
        return None
    if (first.in_features // first.n1) % 2:
        return None  # an odd right factor packs after the transform (real_linear); keep those separate
    bias = None
    given = [p.bias for p in lins if p.bias is not None]
    if given:
        bias = torch.cat([p.bias if p.bias is not None else given[0].new_zeros(p.out_features) for p in lins])
    return FusedQLinear(weight=torch.cat([p.weight for p in lins]), w_scale=torch.cat([p.w_scale for p in lins]),
                        bias=bias, clips=torch.stack([p.clip for p in lins]),
                        sizes=tuple(p.out_features for p in lins), left=first.left, right=first.right, n1=first.n1)

Linear = QLinearParams | FakeLinear


def real_linear(x: Tensor, p: QLinearParams, cpu_codes: Tensor | None = None, counters: Tensor | None = None,
                up: Tensor | None = None, residual: Tensor | None = None) -> Tensor:  # (..., K) -> (..., N)
    """:func:`flatquant.ops.qlinear` (``real``), also for an odd right factor (the activation codes are then
    packed by ``pack_int4`` after the fused transform + quantize instead of inside it); ``cpu_codes`` /
    ``counters``: see :func:`gemm4`; ``up``: ``x`` is the SwiGLU gate and the linear reads ``silu(x) * up``
    (formed inside the transform kernel, :func:`flatquant.ops.kron_quant`); ``residual`` ``(..., N)``: the result
    is ``residual +`` the linear (in the GEMM's epilogue: the GEMV's at decode, the W8A8 kernel's at prefill)."""
    if p.a_bits != 4:
        y = qlinear(x if up is None else swiglu(x, up), p, "real")
        return y if residual is None else residual + y
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    up2 = None if up is None else up.reshape(-1, k)
    res2 = None if residual is None else residual.reshape(-1, p.out_features)
    if unpacked_prefill(x2, cpu_codes):
        codes8, scale = kron_quant(x2, p.left, p.right, p.clip, p.n1, 4, False, up2)
        out = w8a8_matmul(codes8, scale, unpack_int4(p.weight), p.w_scale, p.bias, x.dtype, res2)
        return out.reshape(*x.shape[:-1], p.out_features)
    pack = (k // p.n1) % 2 == 0 and cpu_codes is None  # the CPU product with cpu_codes takes int8 codes
    codes, scale = kron_quant(x2, p.left, p.right, p.clip, p.n1, 4, pack, up2)
    if not pack and cpu_codes is None:
        codes = pack_int4(codes)
    out = gemm4(codes, scale, p.weight, p.w_scale, p.bias, x.dtype, cpu_codes, counters, res2)
    return out.reshape(*x.shape[:-1], p.out_features)
