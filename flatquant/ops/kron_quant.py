"""Fused online transform + LAC + per-token symmetric quantization (+ int4 packing): ``flatquant::kron_quant``.

One op covers the three online transforms of a decoder layer that feed a quantized linear:

* Kronecker ``leftᵀ X right`` (ln / up_gate / down transforms; any factorable n, e.g. 576 = 24×24, 11008 = 86×128);
* head mixing for o_proj, ``Oᵀ Y`` with ``Y`` the ``(heads, head_dim)`` view: ``left = O``, ``right = None``;
* a per-head right transform (``right`` only, ``n1 = heads``).

Tile sides are padded to powers of two (>= 16) and masked, so no dimension needs to be a power of two.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, next_pow2, on_cpu, round_to_bf16_f32, sm_count
from ._register import register_op


@triton.jit
def _kron_quant_kernel(
    x_ptr, l_ptr, r_ptr, clip_ptr, q_ptr, s_ptr,
    T, n1, n2, stride_xt, stride_qt, stride_qg, stride_sg,
    N1P: tl.constexpr, N2P: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, F32_DOT: tl.constexpr,
):
    # Program p handles tokens p, p + P, p + 2P, ... (P programs): the factors are loaded once per program, not
    # once per token (at K = 14336 they are 2 x 32 KB against 28 KB of token). Per token:
    # X (n1, n2) -> Y = Lᵀ (X R) -> LAC -> sym per-token codes (-> packed nibbles).
    # G clip pairs: the transform runs once per token and G code sets are written (q/k/v or gate/up share one
    # transform but each linear has its own LAC), set g at q_ptr + g * stride_qg, s_ptr + g * stride_sg.
    # F32_DOT (the interpreter, whose dot mishandles bf16, and fp32 inputs, which must not drop to TF32):
    # exact fp32 products, the same function as a 16-bit tensor-core dot with fp32 accumulation.
    i = tl.arange(0, N1P)
    j = tl.arange(0, N2P)
    row_ok = i < n1
    col_ok = j < n2
    ia = tl.arange(0, N1P)
    jr = tl.arange(0, N2P)
    if HAS_RIGHT:
        r = tl.load(r_ptr + jr[:, None] * n2 + j[None, :], mask=(jr < n2)[:, None] & col_ok[None, :], other=0.0)
    else:
        r = tl.zeros((N2P, N2P), dtype=x_ptr.dtype.element_ty)  # unused
    if HAS_LEFT:
        # Lᵀ loaded directly transposed: lt[a, b] = L[b, a].
        lt = tl.load(l_ptr + i[None, :] * n1 + ia[:, None], mask=(ia < n1)[:, None] & row_ok[None, :], other=0.0)
    else:
        lt = tl.zeros((N1P, N1P), dtype=x_ptr.dtype.element_ty)  # unused
    # The G clip pairs, loaded once before the token loop (not after each token's reductions, where every scalar
    # load was one more global-memory round trip on the critical path of a single-token decode call).
    gg = tl.arange(0, GP)
    clip_lo = tl.load(clip_ptr + 2 * gg, mask=gg < G, other=0.0)
    clip_hi = tl.load(clip_ptr + 2 * gg + 1, mask=gg < G, other=0.0)
    for tt in range(tl.program_id(0), T, tl.num_programs(0)):
        t = tl.cast(tt, tl.int64)
        x = tl.load(x_ptr + t * stride_xt + i[:, None] * n2 + j[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_RIGHT:
            # X R with fp32 accumulation; rounded back to x's dtype only when a left product follows.
            if F32_DOT:
                y = tl.dot(x.to(tl.float32), r.to(tl.float32), input_precision="ieee")
            else:
                y = tl.dot(x, r)
            if HAS_LEFT:
                if F32_DOT and x_ptr.dtype.element_ty == tl.bfloat16:
                    # The interpreter truncates fp32 -> bf16; round to nearest even on the bits instead.
                    x = round_to_bf16_f32(y)
                else:
                    x = y.to(x_ptr.dtype.element_ty)
        if HAS_LEFT:
            if F32_DOT:
                y = tl.dot(lt.to(tl.float32), x.to(tl.float32), input_precision="ieee")
            else:
                y = tl.dot(lt, x)
        if not HAS_LEFT and not HAS_RIGHT:
            y = x.to(tl.float32)

        # LAC on the row range (which always includes 0; padded entries are 0), then s = max(|lo|, hi) / QMAX.
        y_hi = tl.maximum(tl.max(tl.max(y, axis=1), axis=0), 0.0)
        y_lo = tl.minimum(tl.min(tl.min(y, axis=1), axis=0), 0.0)
        for g in tl.static_range(G):
            hi = y_hi * tl.sum(tl.where(gg == g, clip_hi, 0.0), axis=0)  # exact: one term is not zero
            lo = y_lo * tl.sum(tl.where(gg == g, clip_lo, 0.0), axis=0)
            amax = tl.maximum(-lo, hi)
            scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full((), QMAX, tl.float32)), 1.0)
            v = tl.math.div_rn(y, tl.full(y.shape, 1.0, tl.float32) * scale)
            v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
            # Round half to even: (v + 1.5·2²³) − 1.5·2²³ in fp32 (exact for the clamped |v| <= QMAX + 1).
            q = ((v + 12582912.0) - 12582912.0).to(tl.int32)
            tl.store(s_ptr + g * stride_sg + t, scale)
            q_base = q_ptr + g * stride_qg + t * stride_qt

            if PACK:
                # Flattened element 2k -> low nibble of byte k; n2 is even, so pairs never straddle rows.
                lo_q, hi_q = tl.split(tl.reshape(q, (N1P, N2P // 2, 2)))
                byte = (lo_q & 0xF) | ((hi_q & 0xF) << 4)
                jj = tl.arange(0, N2P // 2)
                half = n2 // 2
                tl.store(q_base + i[:, None] * half + jj[None, :], byte.to(tl.uint8),
                         mask=row_ok[:, None] & (jj < half)[None, :])
            else:
                tl.store(q_base + i[:, None] * n2 + j[None, :], q.to(tl.int8),
                         mask=row_ok[:, None] & col_ok[None, :])


def _check(x: Tensor, left: Tensor | None, right: Tensor | None, n1: int, bits: int, pack: bool) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, n), got {tuple(x.shape)}")
    n = x.shape[1]
    if n1 < 1 or n % n1:
        raise ValueError(f"n1={n1} does not divide n={n}")
    if left is not None and tuple(left.shape) != (n1, n1):
        raise ValueError(f"left must be ({n1}, {n1}), got {tuple(left.shape)}")
    if right is not None and tuple(right.shape) != (n // n1, n // n1):
        raise ValueError(f"right must be ({n // n1}, {n // n1}), got {tuple(right.shape)}")
    if pack and (bits > 4 or (n // n1) % 2):
        raise ValueError(f"packing needs bits <= 4 and an even n2 (bits={bits}, n2={n // n1})")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")


def _check_clips(clips: Tensor) -> None:
    if clips.dim() != 2 or clips.shape[1] != 2 or clips.shape[0] < 1:
        raise ValueError(f"clips must be (G, 2) with G >= 1, got {tuple(clips.shape)}")


def grid_programs(device: torch.device) -> int:
    """Default grid cap: 4 programs per SM on CUDA (3 on CPU, so the interpreter exercises the token loop)."""
    if device.type != "cuda":
        return 3
    return 4 * sm_count(device)


def kron_quant_triton(
    x: Tensor,  # (T, n1 * n2) fp16/bf16
    left: Tensor | None,  # (n1, n1) x.dtype
    right: Tensor | None,  # (n2, n2) x.dtype
    clip: Tensor,  # (2,) or (G, 2) fp32: [lo factor, hi factor] per clip pair
    n1: int,
    bits: int = 4,
    pack: bool = True,
    programs: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
) -> tuple[Tensor, Tensor]:
    """Triton launcher of :func:`kron_quant` / :func:`kron_quant_multi` (interpreter on CPU tensors).

    Returns ``(codes, scale)``: ``(T, n/2)`` / ``(T,)`` for a ``(2,)`` clip, ``(G, T, n/2)`` / ``(G, T)`` for a
    ``(G, 2)`` clip (the transform runs once per token either way). ``programs`` caps the grid (each program loops
    over its share of the tokens); default: 4 per SM on CUDA. ``num_warps`` (default 8 at up to 64 tokens, else 4)
    and ``num_stages`` are Triton launch options (CUDA only).
    """
    _check(x, left, right, n1, bits, pack)
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    multi = clip.dim() == 2
    clips = clip.float().reshape(-1, 2).contiguous()
    g = clips.shape[0]
    t, n = x.shape
    n2 = n // n1
    x = x.contiguous()
    left = left.to(x.dtype).contiguous() if left is not None else None
    right = right.to(x.dtype).contiguous() if right is not None else None
    # A single clip pair gets 2-D outputs of its own (a view of a 3-D buffer would be cloned by the custom op).
    lead = (g, t) if multi else (t,)
    codes = torch.empty(*lead, n // 2 if pack else n, dtype=torch.uint8 if pack else torch.int8, device=x.device)
    scale = torch.empty(*lead, dtype=torch.float32, device=x.device)
    stride_qg, stride_sg = (codes.stride(0), scale.stride(0)) if multi else (0, 0)
    if t > 0:
        n1p, n2p = next_pow2(n1), next_pow2(n2)
        cpu = on_cpu(x)
        kernel = cpu_kernel(_kron_quant_kernel) if cpu else _kron_quant_kernel
        # H200 (bench/results/probe_decode_h200.json): 8 warps at a few tokens (K=14336: 18.4 vs 20.6 us at one
        # token), 4 warps with 4 programs per SM at many (K=14336, 32768 tokens: 2.21 vs 3.36 ms).
        warps = num_warps or (8 if t <= 64 else 4)
        extra = {} if cpu else {"num_warps": warps, "num_stages": num_stages}
        kernel[(min(t, programs or grid_programs(x.device)),)](
            x, left if left is not None else x, right if right is not None else x, clips,
            codes, scale, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg, stride_sg,
            N1P=n1p, N2P=n2p, G=g, GP=next_pow2(g, floor=2), HAS_LEFT=left is not None, HAS_RIGHT=right is not None,
            QMAX=2 ** (bits - 1) - 1, PACK=pack, F32_DOT=cpu or x.dtype == torch.float32, **extra,
        )
    return codes, scale


def kron_quant_multi_triton(
    x: Tensor, left: Tensor | None, right: Tensor | None, clips: Tensor, n1: int, bits: int = 4, pack: bool = True,
    **launch: Any,
) -> tuple[Tensor, Tensor]:
    """Triton launcher of :func:`kron_quant_multi`: :func:`kron_quant_triton` with ``(G, 2)`` clips only."""
    _check_clips(clips)
    return kron_quant_triton(x, left, right, clips, n1, bits, pack, **launch)


def _kron_quant_fake(x: Tensor, pack: bool, **_: object) -> tuple[Tensor, Tensor]:
    t, n = x.shape
    codes = x.new_empty(t, n // 2 if pack else n, dtype=torch.uint8 if pack else torch.int8)
    return codes, x.new_empty(t, dtype=torch.float32)


@register_op("flatquant::kron_quant", cuda=kron_quant_triton, fake=_kron_quant_fake)
def kron_quant(
    x: Tensor, left: Tensor | None, right: Tensor | None, clip: Tensor, n1: int, bits: int = 4, pack: bool = True
) -> tuple[Tensor, Tensor]:
    """Per token: ``leftᵀ X right`` -> LAC clip -> symmetric ``bits`` quantization (-> int4 packing).

    Args:
        x: ``(T, n)`` fp16/bf16 activations, ``n = n1 * n2``.
        left: ``(n1, n1)`` or None; right: ``(n2, n2)`` or None (identity when None).
        clip: ``(2,)`` fp32 LAC factors ``[σ(lo logit), σ(hi logit)]`` (ones for no clipping).
        n1: the left factor size.
        bits: code width; pack: pack two codes per byte (``bits <= 4``).

    Returns:
        ``codes`` ``(T, n/2)`` uint8 when packed else ``(T, n)`` int8, and ``scale`` ``(T,)`` fp32.
    """
    _check(x, left, right, n1, bits, pack)
    return ref.kron_quant_ref(x, left, right, clip[0], clip[1], n1, bits, pack)


def _kron_quant_multi_fake(x: Tensor, clips: Tensor, pack: bool, **_: object) -> tuple[Tensor, Tensor]:
    t, n = x.shape
    g = clips.shape[0]
    codes = x.new_empty(g, t, n // 2 if pack else n, dtype=torch.uint8 if pack else torch.int8)
    return codes, x.new_empty(g, t, dtype=torch.float32)


@register_op("flatquant::kron_quant_multi", cuda=kron_quant_multi_triton, fake=_kron_quant_multi_fake)
def kron_quant_multi(
    x: Tensor, left: Tensor | None, right: Tensor | None, clips: Tensor, n1: int, bits: int = 4, pack: bool = True
) -> tuple[Tensor, Tensor]:
    """:func:`kron_quant` for G linears that read the same transformed activation with their own LAC pairs
    (q/k/v, gate/up): the transform runs once per token, the clip + quantize G times.

    Args:
        clips: ``(G, 2)`` fp32 LAC factors, one ``[lo, hi]`` row per linear; the rest as :func:`kron_quant`.

    Returns:
        ``codes`` ``(G, T, n/2)`` uint8 (packed) or ``(G, T, n)`` int8, and ``scale`` ``(G, T)`` fp32; slice ``g``
        equals ``kron_quant(x, left, right, clips[g], n1, bits, pack)``.
    """
    _check(x, left, right, n1, bits, pack)
    _check_clips(clips)
    return ref.kron_quant_multi_ref(x, left, right, clips, n1, bits, pack)
