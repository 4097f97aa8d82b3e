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
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..core.norm import rms_norm
from . import reference as ref
from ._launch import cpu_kernel, launch_options, next_pow2, on_cpu, pdl_wait, round_to_bf16_f32, sm_count
from ._register import register_op


@triton.jit
def _load_act(x_ptr, u_ptr, offs, mask, HAS_GLU: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Activations at ``offs``; with ``HAS_GLU`` ``x`` is the gate and the activation is ``silu(gate) * up`` in x's
    dtype, rounded as eager PyTorch rounds it (``silu`` in fp32 rounded to x's dtype, then the product rounded).
    INTERPRET_BF16: the interpreter truncates fp32 -> bf16, so the roundings go through the bits."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_GLU:
        gf = x.to(tl.float32)
        s = gf / (1.0 + tl.exp(-gf))
        if INTERPRET_BF16:
            s = round_to_bf16_f32(s)
        else:
            s = s.to(x_ptr.dtype.element_ty).to(tl.float32)
        p = s * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if INTERPRET_BF16:
            p = round_to_bf16_f32(p)
        x = p.to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _load_token(x_ptr, u_ptr, t, stride_xt, n2, i, row_ok, N2P: tl.constexpr, HAS_GLU: tl.constexpr,
                INTERPRET_BF16: tl.constexpr):
    """Token ``t`` as its ``(N1P, N2P)`` matrix ``X`` (padding 0)."""
    j = tl.arange(0, N2P)
    return _load_act(x_ptr, u_ptr, t * stride_xt + i[:, None] * n2 + j[None, :], row_ok[:, None] & (j < n2)[None, :],
                     HAS_GLU, INTERPRET_BF16)


@triton.jit
def _rms_norm_tile(x, w, n, eps, INTERPRET_BF16: tl.constexpr):
    """RMSNorm of a whole token's ``(N1P, N2P)`` tile ``x`` (padding 0) with the weight tile ``w`` (fp32), the
    operations of :func:`flatquant.core.norm.rms_norm`: fp32 mean of squares over the ``n`` elements, ``x · (1 /
    sqrt(mean + eps))`` (square root and division correctly rounded) times the weight, cast once to x's dtype.
    Equal to it up to the summation order of the mean (and, on CUDA, torch's approximate rsqrt): a normalised value
    may differ in its last bit, so a code may move by one at a rounding tie."""
    xf = x.to(tl.float32)
    return _rms_scaled(xf, _inv_rms(tl.sum(tl.sum(xf * xf, axis=1), axis=0), n, eps), w, x.dtype, INTERPRET_BF16)


@triton.jit
def _inv_rms(sq_sum, n, eps):
    """``1 / sqrt(sq_sum / n + eps)``, square root and division correctly rounded (scalar or one per token)."""
    return tl.math.div_rn(1.0, tl.math.sqrt_rn(sq_sum / n + eps))


@triton.jit
def _rms_scaled(xf, r, w, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """``(xf · r) · w`` in fp32 (``r`` broadcasts against ``xf``), cast once to ``dtype`` (rounded to nearest)."""
    y = (xf * r) * w
    if INTERPRET_BF16:
        y = round_to_bf16_f32(y)
    return y.to(dtype)


@triton.jit
def _rms_norm_tokens(x, w, n, eps, INTERPRET_BF16: tl.constexpr):
    """:func:`_rms_norm_tile` of each token of a ``(TB, N1P, N2P)`` tile ``x`` (``w``: the ``(N1P, N2P)`` fp32
    weight tile); the same operations per token."""
    xf = x.to(tl.float32)
    r = _inv_rms(tl.sum(tl.sum(xf * xf, axis=2), axis=1), n, eps)
    return _rms_scaled(xf, r[:, None, None], w[None, :, :], x.dtype, INTERPRET_BF16)


@triton.jit
def _load_norm_weight(nw_ptr, n2, i, row_ok, N2P: tl.constexpr):
    """The RMSNorm weight as the token's ``(N1P, N2P)`` fp32 tile (padding 0)."""
    j = tl.arange(0, N2P)
    return tl.load(nw_ptr + i[:, None] * n2 + j[None, :], mask=row_ok[:, None] & (j < n2)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _mma(a, b, F32_DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation; F32_DOT: exact fp32 products (see :func:`_y_cols`)."""
    if F32_DOT:
        y = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        y = tl.dot(a, b)
    return y


@triton.jit
def _rounded(y, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """fp32 ``y`` rounded to ``dtype`` (the interpreter truncates fp32 -> bf16, so there the rounding to nearest
    even goes through the bits and the values stay in fp32)."""
    if INTERPRET_BF16:
        out = round_to_bf16_f32(y)
    else:
        out = y.to(dtype)
    return out


@triton.jit
def _y_cols(
    x, x_ptr, u_ptr, lt, r_ptr, t, stride_xt, n1, n2, j0, i, row_ok,
    N2P: tl.constexpr, BJ: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_GLU: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    """Columns ``[j0, j0 + BJ)`` of token ``t``'s ``Y = Lᵀ X R``, fp32 ``(N1P, BJ)`` (padding 0).

    ``x``: the token's whole ``X`` (:func:`_load_token`) when ``HAS_RIGHT``, else unused (the column block is
    loaded here). ``X R`` accumulates in fp32 and is rounded to x's dtype only when a left product follows.
    F32_DOT (the interpreter, whose dot mishandles bf16, and fp32 inputs, which must not drop to TF32): exact fp32
    products, the same function as a 16-bit tensor-core dot with fp32 accumulation.
    """
    jj = j0 + tl.arange(0, BJ)
    jj_ok = jj < n2
    if HAS_RIGHT:
        j = tl.arange(0, N2P)
        r = tl.load(r_ptr + j[:, None] * n2 + jj[None, :], mask=(j < n2)[:, None] & jj_ok[None, :], other=0.0)
        y = _mma(x, r, F32_DOT)
        if HAS_LEFT:
            xb = _rounded(y, x_ptr.dtype.element_ty, INTERPRET_BF16)
    else:
        xb = _load_act(x_ptr, u_ptr, t * stride_xt + i[:, None] * n2 + jj[None, :], row_ok[:, None] & jj_ok[None, :],
                       HAS_GLU, INTERPRET_BF16)
        y = xb.to(tl.float32)
    if HAS_LEFT:
        y = _mma(lt, xb, F32_DOT)
    return y


@triton.jit
def _lac_scale(y_hi, y_lo, clip_lo, clip_hi, gg, g: tl.constexpr, QMAX: tl.constexpr):
    """Scale of clip pair ``g`` for token ranges ``[y_lo, y_hi]`` (scalars, or one per token; they include 0):
    ``max(-lo, hi) / QMAX`` with ``lo, hi`` the clipped range, 1 for an all-zero token."""
    hi = y_hi * tl.sum(tl.where(gg == g, clip_hi, 0.0), axis=0)  # exact: one term is not zero
    lo = y_lo * tl.sum(tl.where(gg == g, clip_lo, 0.0), axis=0)
    amax = tl.maximum(-lo, hi)
    return tl.where(amax > 0, tl.math.div_rn(amax, tl.full((), QMAX, tl.float32)), 1.0)


@triton.jit
def _fast_scales(scale, ymax):
    """Whether :func:`_quotient_fast` may skip the division for a token of scale ``scale`` whose largest magnitude is
    ``ymax`` (elementwise for tensors): the scale in (2^-100, 2^100), and every quotient below 2^20 in magnitude, so
    that ``y · RN(1 / scale)`` cannot overflow (a clip factor near 0 with huge tokens can push ``y / scale`` past the
    fp32 range, and an infinite first quotient makes the FMA correction NaN). One test per token instead of one
    compare-and-select per element."""
    return (scale > 7.9e-31) & (scale < 1.2e30) & (ymax < 1048576.0 * scale)


@triton.jit
def _quotient(y, scale):
    """``y / scale``, correctly rounded (``scale``: a scalar or one that broadcasts against ``y``)."""
    return tl.math.div_rn(y, tl.full(y.shape, 1.0, tl.float32) * scale)


@triton.jit
def _codes(y, scale, fast_ok, QMAX: tl.constexpr, FAST_Q: tl.constexpr, INTERPRET: tl.constexpr):
    """``rne(clamp(y / scale, -QMAX - 1, QMAX))`` as int32, the quotient correctly rounded; ``scale`` is a scalar
    or broadcasts against ``y``. FAST_Q: the quotient without a per-element division (:func:`_quotient_fast`, the
    same quotient; ``fast_ok``: :func:`_fast_scales` of every scale involved) and, on CUDA, one ``cvt.rni`` for
    the rounding; else, and in the interpreter, the rounding is ``(v + 1.5·2²³) − 1.5·2²³`` in fp32 (exact for
    the clamped ``|v| <= QMAX + 1``). Round half to even either way."""
    if FAST_Q:
        v = _quotient_fast(y, scale, fast_ok, INTERPRET)
    else:
        v = _quotient(y, scale)
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    if FAST_Q and not INTERPRET:
        q = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    else:
        q = ((v + 12582912.0) - 12582912.0).to(tl.int32)
    return q


@triton.jit
def _nibbles(pairs):
    """Packed bytes of int32 codes whose last axis holds (even, odd) element pairs: the even element in the low
    nibble; the result drops that axis."""
    lo_q, hi_q = tl.split(pairs)
    return ((lo_q & 0xF) | ((hi_q & 0xF) << 4)).to(tl.uint8)


@triton.jit
def _quant_cols(
    y, y_hi, y_lo, clip_lo, clip_hi, gg, q_ptr, s_ptr, t, n2, j0, i, row_ok, stride_qt, stride_qg, stride_sg,
    store_scale, N1P: tl.constexpr, BJ: tl.constexpr, G: tl.constexpr, QMAX: tl.constexpr, PACK: tl.constexpr,
    FAST_Q: tl.constexpr = False, INTERPRET: tl.constexpr = False,
):
    """LAC + symmetric codes of columns ``[j0, j0 + BJ)`` of ``y`` for each of the G clip pairs, given the token's
    range ``[y_lo, y_hi]`` (which includes 0): ``s = max(-lo, hi) / QMAX`` with ``lo, hi`` the clipped range.
    Code set g goes to ``q_ptr + g * stride_qg`` (packed: two codes per byte, element 2k in the low nibble), its
    scale to ``s_ptr + g * stride_sg`` if ``store_scale``. FAST_Q: the same codes without a per-element division
    (:func:`_codes`)."""
    for g in tl.static_range(G):
        scale = _lac_scale(y_hi, y_lo, clip_lo, clip_hi, gg, g, QMAX)
        q = _codes(y, scale, _fast_scales(scale, tl.maximum(y_hi, -y_lo)), QMAX, FAST_Q, INTERPRET)
        tl.store(s_ptr + g * stride_sg + t, scale, mask=store_scale)
        q_base = q_ptr + g * stride_qg + t * stride_qt
        if PACK:
            # Flattened element 2k -> low nibble of byte k; n2 and j0 are even, so pairs never straddle rows.
            jh = j0 // 2 + tl.arange(0, BJ // 2)
            half = n2 // 2
            tl.store(q_base + i[:, None] * half + jh[None, :], _nibbles(tl.reshape(q, (N1P, BJ // 2, 2))),
                     mask=row_ok[:, None] & (jh < half)[None, :])
        else:
            jj = j0 + tl.arange(0, BJ)
            tl.store(q_base + i[:, None] * n2 + jj[None, :], q.to(tl.int8), mask=row_ok[:, None] & (jj < n2)[None, :])


@triton.jit
def _load_lt(l_ptr, n1, i, row_ok, x_dtype: tl.constexpr, N1P: tl.constexpr, HAS_LEFT: tl.constexpr):
    """Lᵀ ``(N1P, N1P)``, loaded transposed (``lt[a, b] = L[b, a]``); zeros (unused) without a left factor."""
    ia = tl.arange(0, N1P)
    if HAS_LEFT:
        return tl.load(l_ptr + i[None, :] * n1 + ia[:, None], mask=(ia < n1)[:, None] & row_ok[None, :], other=0.0)
    return tl.zeros((N1P, N1P), dtype=x_dtype)


@triton.jit
def _load_factors(l_ptr, r_ptr, n1, n2, x_dtype: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr):
    """For the layouts that load both factors once per program: the left side's index vector and row mask, Lᵀ
    ``(N1P, N1P)`` and R ``(N2P, N2P)``, zero-padded."""
    i = tl.arange(0, N1P)
    row_ok = i < n1
    lt = _load_lt(l_ptr, n1, i, row_ok, x_dtype, N1P, True)
    j = tl.arange(0, N2P)
    r = tl.load(r_ptr + j[:, None] * n2 + j[None, :], mask=(j < n2)[:, None] & (j < n2)[None, :], other=0.0)
    return i, row_ok, lt, r


@triton.jit
def _load_clips(clip_ptr, G: tl.constexpr, GP: tl.constexpr):
    """The G clip pairs as ``(GP,)`` lo / hi vectors, and their index vector."""
    gg = tl.arange(0, GP)
    clip_lo = tl.load(clip_ptr + 2 * gg, mask=gg < G, other=0.0)
    clip_hi = tl.load(clip_ptr + 2 * gg + 1, mask=gg < G, other=0.0)
    return gg, clip_lo, clip_hi


@triton.jit
def _kron_quant_kernel(
    x_ptr, u_ptr, l_ptr, r_ptr, clip_ptr, q_ptr, s_ptr, ws_ptr, nw_ptr,
    T, n1, n2, stride_xt, stride_qt, stride_qg, stride_sg, eps,
    N1P: tl.constexpr, N2P: tl.constexpr, BJ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # Program p handles tokens p, p + P, p + 2P, ... (P programs): the factors are loaded once per program, not
    # once per token. Per token: X (n1, n2) -> Y = Lᵀ (X R) -> LAC -> sym per-token codes (-> packed nibbles), for
    # G clip pairs (q/k/v or gate/up share one transform but each linear has its own LAC).
    # BJ < N2P (chunked): Y is built BJ columns at a time (smaller register tiles for large factors), each block
    # parked in fp32 in this program's slot of ws_ptr ((P, N1P, N2P), L2-resident) while the range is reduced,
    # then read back and quantized. BJ == N2P: the whole Y stays in registers.
    # HAS_NORM (needs HAS_RIGHT, so that the whole token is loaded at once): X is the token's RMSNorm with the
    # weight at nw_ptr (the layer's input / post-attention norm, never written out).
    i = tl.arange(0, N1P)
    row_ok = i < n1
    lt = _load_lt(l_ptr, n1, i, row_ok, x_ptr.dtype.element_ty, N1P, HAS_LEFT)
    if HAS_NORM:
        nw = _load_norm_weight(nw_ptr, n2, i, row_ok, N2P)
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    NB: tl.constexpr = N2P // BJ
    jb = tl.arange(0, BJ)
    slot = ws_ptr + tl.program_id(0).to(tl.int64) * (N1P * N2P) + i[:, None] * N2P + jb[None, :]
    pdl_wait(PDL)  # the factors and clips above are constant inputs
    for tt in range(tl.program_id(0), T, tl.num_programs(0)):
        t = tl.cast(tt, tl.int64)
        if HAS_RIGHT:
            x = _load_token(x_ptr, u_ptr, t, stride_xt, n2, i, row_ok, N2P, HAS_GLU, INTERPRET_BF16)
            if HAS_NORM:
                x = _rms_norm_tile(x, nw, n1 * n2, eps, INTERPRET_BF16)
        else:
            x = tl.zeros((N1P, N2P), dtype=x_ptr.dtype.element_ty)  # unused: _y_cols loads its columns
        if NB == 1:
            y = _y_cols(x, x_ptr, u_ptr, lt, r_ptr, t, stride_xt, n1, n2, 0, i, row_ok, N2P, BJ, HAS_LEFT, HAS_RIGHT,
                        F32_DOT, HAS_GLU, INTERPRET_BF16)
            y_hi = tl.maximum(tl.max(tl.max(y, axis=1), axis=0), 0.0)
            y_lo = tl.minimum(tl.min(tl.min(y, axis=1), axis=0), 0.0)
            _quant_cols(y, y_hi, y_lo, clip_lo, clip_hi, gg, q_ptr, s_ptr, t, n2, 0, i, row_ok, stride_qt,
                        stride_qg, stride_sg, True, N1P, BJ, G, QMAX, PACK)
        else:
            y_hi = tl.full((), 0.0, tl.float32)
            y_lo = tl.full((), 0.0, tl.float32)
            for c in range(NB):
                y = _y_cols(x, x_ptr, u_ptr, lt, r_ptr, t, stride_xt, n1, n2, c * BJ, i, row_ok, N2P, BJ, HAS_LEFT,
                            HAS_RIGHT, F32_DOT, HAS_GLU, INTERPRET_BF16)
                y_hi = tl.maximum(y_hi, tl.max(tl.max(y, axis=1), axis=0))
                y_lo = tl.minimum(y_lo, tl.min(tl.min(y, axis=1), axis=0))
                tl.store(slot + c * BJ, y)
            tl.debug_barrier()  # the slot is read back by other threads of this program
            for c in range(NB):
                y = tl.load(slot + c * BJ)
                _quant_cols(y, y_hi, y_lo, clip_lo, clip_hi, gg, q_ptr, s_ptr, t, n2, c * BJ, i, row_ok,
                            stride_qt, stride_qg, stride_sg, c == 0, N1P, BJ, G, QMAX, PACK)
            tl.debug_barrier()  # the next token overwrites the slot


@triton.jit
def _quotient_fast(y, scale, fast_ok, INTERPRET: tl.constexpr):
    """:func:`_quotient` without a per-element division when ``fast_ok``: with ``r = RN(1 / scale)`` and
    ``q0 = RN(y · r)`` (within one ulp of the quotient), the remainder ``y − q0 · scale`` is exact in one FMA and
    ``RN(q0 + remainder · r)`` is the correctly rounded quotient (Markstein's theorem; it needs the remainder and
    q0 in the normal range: :func:`_fast_scales`, else the division). INTERPRET: older interpreters round an FMA
    twice, so it is emulated in fp64 (the remainder is exact there; the sum rounds twice only if it lands exactly
    on an fp32 midpoint)."""
    if fast_ok:
        r = tl.math.div_rn(1.0, scale)
        q0 = y * r
        if INTERPRET:
            q0d = q0.to(tl.float64)
            e = (y.to(tl.float64) - q0d * scale.to(tl.float64)).to(tl.float32)
            v = (q0d + e.to(tl.float64) * r.to(tl.float64)).to(tl.float32)
        else:
            v = tl.fma(tl.fma(-q0, scale, y), r, q0)
    else:
        v = _quotient(y, scale)
    return v


@triton.jit
def _kron_quant_pipe_kernel(
    x_ptr, u_ptr, l_ptr, r_ptr, clip_ptr, q_ptr, s_ptr, nw_ptr,
    T, n1, n2, stride_xt, stride_qt, stride_qg, stride_sg, eps,
    N1P: tl.constexpr, N2P: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
    FAST_Q: tl.constexpr = False, INTERPRET: tl.constexpr = False,
):
    # The whole layout with both factors, software-pipelined for many tokens: both factors are loaded once per
    # program (the compiler keeps them in shared memory as MMA operands), and the loads of the program's next
    # token are issued before the current token's products, clip and quantization, so that its HBM latency
    # overlaps them instead of starting each token's chain. The same tile math as _kron_quant_kernel (whole).
    # FAST_Q: the codes without a per-element division (_codes, the same codes); INTERPRET: the interpreter.
    i, row_ok, lt, r = _load_factors(l_ptr, r_ptr, n1, n2, x_ptr.dtype.element_ty, N1P, N2P)
    if HAS_NORM:
        nw = _load_norm_weight(nw_ptr, n2, i, row_ok, N2P)
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    pdl_wait(PDL)
    step = tl.num_programs(0)
    x = _load_token(x_ptr, u_ptr, tl.program_id(0).to(tl.int64), stride_xt, n2, i, row_ok, N2P, HAS_GLU,
                    INTERPRET_BF16)
    for tt in range(tl.program_id(0), T, step):
        t = tl.cast(tt, tl.int64)
        nxt = tl.minimum(t + step, T - 1)  # past the end: a harmless reload of the last token (no token mask)
        x_next = _load_token(x_ptr, u_ptr, nxt, stride_xt, n2, i, row_ok, N2P, HAS_GLU, INTERPRET_BF16)
        if HAS_NORM:
            x = _rms_norm_tile(x, nw, n1 * n2, eps, INTERPRET_BF16)
        y = _mma(lt, _rounded(_mma(x, r, F32_DOT), x_ptr.dtype.element_ty, INTERPRET_BF16), F32_DOT)
        y_hi = tl.maximum(tl.max(tl.max(y, axis=1), axis=0), 0.0)
        y_lo = tl.minimum(tl.min(tl.min(y, axis=1), axis=0), 0.0)
        _quant_cols(y, y_hi, y_lo, clip_lo, clip_hi, gg, q_ptr, s_ptr, t, n2, 0, i, row_ok, stride_qt, stride_qg,
                    stride_sg, True, N1P, N2P, G, QMAX, PACK, FAST_Q, INTERPRET)
        x = x_next


@triton.jit
def _load_tokens(x_ptr, u_ptr, t0, T, stride_xt, n1, n2, TB: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr,
                 HAS_GLU: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Tokens ``[t0, t0 + TB)`` as a ``(TB, N1P, N2P)`` tile of their ``X`` matrices (padding and tokens past
    ``T``: 0, not read)."""
    tok = t0 + tl.arange(0, TB).to(tl.int64)
    i = tl.arange(0, N1P)
    j = tl.arange(0, N2P)
    inner = i[:, None] * n2 + j[None, :]
    ok = (i < n1)[:, None] & (j < n2)[None, :]
    return _load_act(x_ptr, u_ptr, tok[:, None, None] * stride_xt + inner[None, :, :],
                     (tok < T)[:, None, None] & ok[None, :, :], HAS_GLU, INTERPRET_BF16)


@triton.jit
def _quant_tokens(
    y, clip_lo, clip_hi, gg, q_ptr, s_ptr, t0, T, n1, n2, stride_qt, stride_qg, stride_sg,
    TB: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr, G: tl.constexpr, QMAX: tl.constexpr,
    PACK: tl.constexpr, FAST_Q: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Per-token range, LAC and symmetric codes of the ``(TB, N1P, N2P)`` tile ``y`` (tokens ``[t0, t0 + TB)``,
    padding 0) for each of the G clip pairs: :func:`_quant_cols` for TB tokens at once (the same codes and
    scales); tokens past ``T`` are not stored."""
    tok = t0 + tl.arange(0, TB).to(tl.int64)
    tok_ok = tok < T
    y_hi = tl.maximum(tl.max(tl.max(y, axis=2), axis=1), 0.0)
    y_lo = tl.minimum(tl.min(tl.min(y, axis=2), axis=1), 0.0)
    i = tl.arange(0, N1P)
    for g in tl.static_range(G):
        scale = _lac_scale(y_hi, y_lo, clip_lo, clip_hi, gg, g, QMAX)  # (TB,); 1 for tokens past T
        fast_ok = tl.min(_fast_scales(scale, tl.maximum(y_hi, -y_lo)).to(tl.int32), axis=0) > 0
        q = _codes(y, tl.broadcast_to(scale[:, None, None], (TB, N1P, N2P)), fast_ok, QMAX, FAST_Q, INTERPRET)
        tl.store(s_ptr + g * stride_sg + tok, scale, mask=tok_ok)
        q_base = q_ptr + g * stride_qg + tok[:, None, None] * stride_qt
        if PACK:
            # Flattened element 2k of a token -> low nibble of its byte k (n2 is even: pairs stay in a row).
            jh = tl.arange(0, N2P // 2)
            half = n2 // 2
            ok = (i < n1)[:, None] & (jh < half)[None, :]
            tl.store(q_base + (i[:, None] * half + jh[None, :])[None, :, :],
                     _nibbles(tl.reshape(q, (TB, N1P, N2P // 2, 2))), mask=tok_ok[:, None, None] & ok[None, :, :])
        else:
            j = tl.arange(0, N2P)
            ok = (i < n1)[:, None] & (j < n2)[None, :]
            tl.store(q_base + (i[:, None] * n2 + j[None, :])[None, :, :], q.to(tl.int8),
                     mask=tok_ok[:, None, None] & ok[None, :, :])


@triton.jit
def _kron_quant_tb_kernel(
    x_ptr, u_ptr, l_ptr, r_ptr, clip_ptr, q_ptr, s_ptr, nw_ptr,
    T, n1, n2, stride_xt, stride_qt, stride_qg, stride_sg, eps,
    N1P: tl.constexpr, N2P: tl.constexpr, TB: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = True, INTERPRET: tl.constexpr = False,
):
    # The pipelined layout (both factors loaded once per program, division-free codes) over blocks of TB tokens:
    # program p handles token blocks p, p + P, ... (P programs). The block's X tiles stacked as (TB·N1P, N2P) rows
    # make one right product with R, and the left product is one 2-D product Lᵀ [Z_0 | … | Z_TB-1] (N1P x TB·N2P,
    # the rounded Z = X R tiles side by side). Both are wgmma on sm_90 (Triton 3.6); the permutations are layout
    # relabellings plus the shared-memory store the left product's operand needs anyway. (A batched 3-D left
    # product with Lᵀ broadcast compiled to mma.sync, rank-3 dots get no wgmma, and spilled 19-32 KB per thread
    # at 1-4 tokens per block and 4 or 8 warps.)
    # Ranges, scales and codes per token (_quant_tokens).
    # PREFETCH: the next block's loads are issued before this block's products (in registers, as the pipelined
    # layout does); without it the loads are left to the compiler's loop pipelining (cp.async into shared memory
    # over num_stages: 3 overlaps a load with a whole iteration, 2 issues it at the end of the previous one).
    i, row_ok, lt, r = _load_factors(l_ptr, r_ptr, n1, n2, x_ptr.dtype.element_ty, N1P, N2P)
    if HAS_NORM:
        nw = _load_norm_weight(nw_ptr, n2, i, row_ok, N2P)
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    pdl_wait(PDL)
    step = tl.num_programs(0).to(tl.int64) * TB
    t_first = tl.program_id(0).to(tl.int64) * TB
    if PREFETCH:
        x = _load_tokens(x_ptr, u_ptr, t_first, T, stride_xt, n1, n2, TB, N1P, N2P, HAS_GLU, INTERPRET_BF16)
    for t0 in range(t_first, T, step):
        if PREFETCH:
            x_next = _load_tokens(x_ptr, u_ptr, t0 + step, T, stride_xt, n1, n2, TB, N1P, N2P, HAS_GLU,
                                  INTERPRET_BF16)  # past the end: all masked
        else:
            x = _load_tokens(x_ptr, u_ptr, t0, T, stride_xt, n1, n2, TB, N1P, N2P, HAS_GLU, INTERPRET_BF16)
        if HAS_NORM:
            x = _rms_norm_tokens(x, nw, n1 * n2, eps, INTERPRET_BF16)
        z = _rounded(_mma(tl.reshape(x, (TB * N1P, N2P)), r, F32_DOT), x_ptr.dtype.element_ty, INTERPRET_BF16)
        zs = tl.reshape(tl.permute(tl.reshape(z, (TB, N1P, N2P)), (1, 0, 2)), (N1P, TB * N2P))
        y = tl.permute(tl.reshape(_mma(lt, zs, F32_DOT), (N1P, TB, N2P)), (1, 0, 2))
        _quant_tokens(y, clip_lo, clip_hi, gg, q_ptr, s_ptr, t0, T, n1, n2, stride_qt, stride_qg, stride_sg, TB,
                      N1P, N2P, G, QMAX, PACK, True, INTERPRET)
        if PREFETCH:
            x = x_next


@triton.jit
def _rounded_opaque(y, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    """:func:`_rounded` (the same values), on CUDA to bf16 / fp16 by one ``cvt.rn`` per pair in inline assembly:
    LLVM sees through a plain conversion and moves it from the producer of a loop-carried value to its consumer
    in the next iteration (a phi of truncations becomes a truncation of a phi), which keeps the fp32 value alive
    across the iteration."""
    if INTERPRET or dtype == tl.float32:
        out = _rounded(y, dtype, INTERPRET_BF16)
    elif dtype == tl.bfloat16:
        out = tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [y], dtype=tl.bfloat16,
                                        is_pure=True, pack=2)
    else:
        out = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [y], dtype=tl.float16,
                                        is_pure=True, pack=2)
    return out


@triton.jit
def _as_operand(x, nw, n, eps, N1P: tl.constexpr, N2P: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                HAS_NORM: tl.constexpr):
    """One token's ``(1, N1P, N2P)`` tile from :func:`_load_tokens` as the ``(N1P, N2P)`` left operand of its right
    product, normalised with HAS_NORM (:func:`_rms_norm_tokens`, ``nw`` the weight tile). The sm_90 compile keeps
    it in registers as the wgmma's A operand (a plain 2-D load is staged in shared memory, which Triton never
    leaves in flight across loop iterations)."""
    if HAS_NORM:
        x = _rms_norm_tokens(x, nw, n, eps, INTERPRET_BF16)
    return tl.reshape(x, (N1P, N2P))


@triton.jit
def _kron_quant_pipemma_kernel(
    x_ptr, u_ptr, l_ptr, r_ptr, clip_ptr, q_ptr, s_ptr, nw_ptr,
    T, n1, n2, stride_xt, stride_qt, stride_qg, stride_sg, eps,
    N1P: tl.constexpr, N2P: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = True, INTERPRET: tl.constexpr = False,
):
    # multi_token at one token per block, software-pipelined by hand so that a token's right product runs on the
    # tensor cores while the previous token's epilogue runs on the ALUs. Program p handles tokens p, p + P, ...;
    # the iteration of token t finds X R of token t + P in flight and the rounded Z of token t done:
    #   Y = Lᵀ Z_t                       wgmma, waited for at once (the epilogue needs it); the wait also
    #                                    retires the in-flight X R of token t + P
    #   Z_{t+P} = rounded(X R)           element-wise
    #   X R of token t + 2P              wgmma left in flight across the rest of the iteration
    #   range, scales, codes, stores     of token t, overlapping that wgmma
    # (the first two tokens' right products run before the loop; tokens past T are zero tiles, neither read nor
    # written: the last two right products of a program are wasted tensor-core work, not memory traffic).
    # Triton 3.6's wgmma pipelining (asyncLaunchDots) leaves a dot in flight only when its result feeds nothing
    # but the next iteration and that iteration first uses it after another dot's wait ("rule 3b"); every other
    # dot is waited for right after it, and a dot staged through an in-loop shared-memory store never qualifies
    # (the right product's X is a register operand here: _as_operand). Without PREFETCH it needs num_stages=1:
    # with the loads pipelined (2-3 stages) the loop scheduler hoists the load-consuming right product above the
    # left one, whose wait then retires it (with PREFETCH the loads feed the loop-carried tile, which the compiler
    # does not pipeline). The rounding to x's dtype is inline assembly (_rounded_opaque), else LLVM moves it
    # into the next iteration, the fp32 X R stays live across the new wgmma, its copy reads the in-flight
    # accumulator and ptxas serialises every wgmma of the kernel (C7514).
    # Without loop pipelining the loads are plain register loads, and the X loaded in an iteration goes through
    # shared memory into the right product's operand layout before the left product is issued: PREFETCH loads it
    # one iteration earlier (carried in registers, more spilling), else its latency precedes the left product.
    i, row_ok, lt, r = _load_factors(l_ptr, r_ptr, n1, n2, x_ptr.dtype.element_ty, N1P, N2P)
    if HAS_NORM:
        nw = _load_norm_weight(nw_ptr, n2, i, row_ok, N2P)
    else:
        nw = tl.zeros((1, 1), dtype=tl.float32)  # unused
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    pdl_wait(PDL)
    step = tl.num_programs(0).to(tl.int64)
    dt = x_ptr.dtype.element_ty
    t0 = tl.program_id(0).to(tl.int64)
    zr = _rounded(_mma(_as_operand(_load_tokens(x_ptr, u_ptr, t0, T, stride_xt, n1, n2, 1, N1P, N2P, HAS_GLU,
                                                INTERPRET_BF16), nw, n1 * n2, eps, N1P, N2P, INTERPRET_BF16,
                                   HAS_NORM), r, F32_DOT), dt, INTERPRET_BF16)  # (N1P, N2P): the first token's Z
    z = _mma(_as_operand(_load_tokens(x_ptr, u_ptr, t0 + step, T, stride_xt, n1, n2, 1, N1P, N2P, HAS_GLU,
                                      INTERPRET_BF16), nw, n1 * n2, eps, N1P, N2P, INTERPRET_BF16, HAS_NORM),
             r, F32_DOT)  # (N1P, N2P): the second token's X R
    if PREFETCH:
        x_next = _load_tokens(x_ptr, u_ptr, t0 + 2 * step, T, stride_xt, n1, n2, 1, N1P, N2P, HAS_GLU, INTERPRET_BF16)
    for t in range(t0, T, step):
        if PREFETCH:
            x = x_next  # (1, N1P, N2P): token t + 2P
            x_next = _load_tokens(x_ptr, u_ptr, t + 3 * step, T, stride_xt, n1, n2, 1, N1P, N2P, HAS_GLU,
                                  INTERPRET_BF16)
        else:
            x = _load_tokens(x_ptr, u_ptr, t + 2 * step, T, stride_xt, n1, n2, 1, N1P, N2P, HAS_GLU, INTERPRET_BF16)
        x = _as_operand(x, nw, n1 * n2, eps, N1P, N2P, INTERPRET_BF16, HAS_NORM)  # (N1P, N2P)
        y = _mma(lt, zr, F32_DOT)  # (N1P, N2P): token t's Y
        zr = _rounded_opaque(z, dt, INTERPRET_BF16, INTERPRET)  # token t + P's Z
        z = _mma(x, r, F32_DOT)  # token t + 2P's X R, in flight during the epilogue
        y_hi = tl.maximum(tl.max(tl.max(y, axis=1), axis=0), 0.0)
        y_lo = tl.minimum(tl.min(tl.min(y, axis=1), axis=0), 0.0)
        _quant_cols(y, y_hi, y_lo, clip_lo, clip_hi, gg, q_ptr, s_ptr, t, n2, 0, i, row_ok, stride_qt, stride_qg,
                    stride_sg, True, N1P, N2P, G, QMAX, PACK, True, INTERPRET)


@triton.jit
def _pair_rows(N2P: tl.constexpr):
    """Row ``m`` of the row-split layout's transposed tiles holds column ``π(m)`` of the token's ``Y``: within each
    16-row block, rows ``m`` and ``m + 8`` (which one thread holds in a wgmma accumulator) are the even / odd
    columns ``2r`` and ``2r + 1`` (``r = m mod 8``), so that packed pairs need no data movement."""
    m = tl.arange(0, N2P)
    return (m // 16) * 16 + 2 * (m % 8) + (m // 8) % 2


@triton.jit
def _hi_lo(hi_a, lo_a, hi_b, lo_b):
    """Combine of a joint (max, min) reduction."""
    return tl.maximum(hi_a, hi_b), tl.minimum(lo_a, lo_b)


@triton.jit
def _cat_cols(a, b):
    """``[a | b]``: two ``(M, W)`` tiles side by side, ``(M, 2W)``."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _load_xt(x_ptr, u_ptr, t, stride_xt, n1, n2, a0, BW: tl.constexpr, N2P: tl.constexpr, HAS_GLU: tl.constexpr,
             INTERPRET_BF16: tl.constexpr):
    """Rows ``[a0, a0 + BW)`` of token ``t``'s ``X``, transposed: ``(N2P, BW)`` (padding 0)."""
    k = tl.arange(0, N2P)
    a = a0 + tl.arange(0, BW)
    return _load_act(x_ptr, u_ptr, t * stride_xt + a[None, :] * n2 + k[:, None], (k < n2)[:, None] & (a < n1)[None, :],
                     HAS_GLU, INTERPRET_BF16)


@triton.jit
def _load_nwt(nw_ptr, n1, n2, a0, BW: tl.constexpr, N2P: tl.constexpr):
    """The RMSNorm weight of rows ``[a0, a0 + BW)``, transposed as :func:`_load_xt`: ``(N2P, BW)`` fp32."""
    k = tl.arange(0, N2P)
    a = a0 + tl.arange(0, BW)
    return tl.load(nw_ptr + a[None, :] * n2 + k[:, None], mask=(k < n2)[:, None] & (a < n1)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _load_l_cols(l_ptr, n1, a0, BW: tl.constexpr, N1P: tl.constexpr):
    """Columns ``[a0, a0 + BW)`` of ``L``, ``(N1P, BW)`` (padding 0): the right operand of ``Yᵀ = Zᵀ L``."""
    a = tl.arange(0, N1P)
    b = a0 + tl.arange(0, BW)
    return tl.load(l_ptr + a[:, None] * n1 + b[None, :], mask=(a < n1)[:, None] & (b < n1)[None, :], other=0.0)


@triton.jit
def _store_codes_t(q, q_base, n1, n2, a0, BW: tl.constexpr, N2P: tl.constexpr, PACK: tl.constexpr):
    """Store the int32 codes ``q`` ``(N2P, BW)`` of rows ``[a0, a0 + BW)`` of a token's ``Y``, transposed with its
    rows in :func:`_pair_rows` order, at ``q_base`` (packed: element 2k in the low nibble of byte k)."""
    b = a0 + tl.arange(0, BW)
    if PACK:
        # rows (16w + r, 16w + 8 + r) are columns (2(8w + r), 2(8w + r) + 1): byte 8w + r of each row of Y
        pairs = tl.reshape(tl.permute(tl.reshape(q, (N2P // 16, 2, 8, BW)), (0, 2, 3, 1)), (N2P // 2, BW, 2))
        jh = tl.arange(0, N2P // 2)
        half = n2 // 2
        tl.store(q_base + b[None, :] * half + jh[:, None], _nibbles(pairs),
                 mask=(jh < half)[:, None] & (b < n1)[None, :])
    else:
        j = _pair_rows(N2P)
        tl.store(q_base + b[None, :] * n2 + j[:, None], q.to(tl.int8), mask=(j < n2)[:, None] & (b < n1)[None, :])


@triton.jit
def _kron_quant_rowsplit_kernel(
    x_ptr, u_ptr, l_ptr, r_ptr, clip_ptr, q_ptr, s_ptr, nw_ptr,
    T, n1, n2, stride_xt, stride_qt, stride_qg, stride_sg, eps,
    N1P: tl.constexpr, N2P: tl.constexpr, NBLK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
    INTERPRET: tl.constexpr = False,
):
    # multi_token at one token per block, transposed, with the token's n1 rows split into NBLK blocks of N1P/2,
    # N1P/4 (and N1P/8) rows instead of one block of N1P (86 -> 64 + 32, 112 -> 64 + 32 + 16 of 128): per token
    # Zᵀ = Rᵀ Xᵀ is one product per block (M = N2P, K = N2P, N = the block; wgmma needs M >= 64, not N), the
    # rounded blocks side by side with zeros up to N1P make the left operand of Yᵀ = Zᵀ L, computed per column
    # block of L (K = N1P whole: each output sums over the same terms in the same order as whole's Lᵀ Z, so the
    # codes are whole's bit for bit; a K split would change the fp32 summation order). The range, codes and
    # packing run over N2P x (64 + 32 [+ 16]) elements instead of N2P x N1P. Rᵀ is loaded with its rows in
    # _pair_rows order, so that the two codes of a packed byte are held by one thread.
    m_cols = _pair_rows(N2P)
    k = tl.arange(0, N2P)
    rt = tl.load(r_ptr + k[None, :] * n2 + m_cols[:, None], mask=(m_cols < n2)[:, None] & (k < n2)[None, :],
                 other=0.0)  # (N2P, N2P): rt[m, k] = R[k, π(m)]
    BA: tl.constexpr = N1P // 2
    BB: tl.constexpr = N1P // 4
    BC: tl.constexpr = N1P // 8
    l_a = _load_l_cols(l_ptr, n1, 0, BA, N1P)
    l_b = _load_l_cols(l_ptr, n1, BA, BB, N1P)
    if NBLK == 3:
        l_c = _load_l_cols(l_ptr, n1, BA + BB, BC, N1P)
    if HAS_NORM:
        nw_a = _load_nwt(nw_ptr, n1, n2, 0, BA, N2P)
        nw_b = _load_nwt(nw_ptr, n1, n2, BA, BB, N2P)
        if NBLK == 3:
            nw_c = _load_nwt(nw_ptr, n1, n2, BA + BB, BC, N2P)
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    pdl_wait(PDL)
    dt = x_ptr.dtype.element_ty
    for tt in range(tl.program_id(0), T, tl.num_programs(0)):
        t = tl.cast(tt, tl.int64)
        xa = _load_xt(x_ptr, u_ptr, t, stride_xt, n1, n2, 0, BA, N2P, HAS_GLU, INTERPRET_BF16)  # (N2P, BA)
        xb = _load_xt(x_ptr, u_ptr, t, stride_xt, n1, n2, BA, BB, N2P, HAS_GLU, INTERPRET_BF16)  # (N2P, BB)
        if NBLK == 3:
            xc = _load_xt(x_ptr, u_ptr, t, stride_xt, n1, n2, BA + BB, BC, N2P, HAS_GLU, INTERPRET_BF16)
        if HAS_NORM:  # the mean of squares summed per block: may differ from whole's in its last bit
            fa = xa.to(tl.float32)
            fb = xb.to(tl.float32)
            sq = tl.sum(tl.sum(fa * fa, axis=1), axis=0) + tl.sum(tl.sum(fb * fb, axis=1), axis=0)
            if NBLK == 3:
                fc = xc.to(tl.float32)
                sq += tl.sum(tl.sum(fc * fc, axis=1), axis=0)
            inv = _inv_rms(sq, n1 * n2, eps)
            xa = _rms_scaled(fa, inv, nw_a, dt, INTERPRET_BF16)
            xb = _rms_scaled(fb, inv, nw_b, dt, INTERPRET_BF16)
            if NBLK == 3:
                xc = _rms_scaled(fc, inv, nw_c, dt, INTERPRET_BF16)
        za = _rounded(_mma(rt, xa, F32_DOT), dt, INTERPRET_BF16)  # (N2P, BA): rows π(m) of Z's columns, Z = X R
        zb = _rounded(_mma(rt, xb, F32_DOT), dt, INTERPRET_BF16)  # (N2P, BB)
        if NBLK == 3:
            zc = _rounded(_mma(rt, xc, F32_DOT), dt, INTERPRET_BF16)  # (N2P, BC)
            zt = _cat_cols(za, _cat_cols(zb, _cat_cols(zc, tl.zeros_like(zc))))  # (N2P, N1P)
        else:
            zt = _cat_cols(za, _cat_cols(zb, tl.zeros_like(zb)))  # (N2P, N1P)
        ya = _mma(zt, l_a, F32_DOT)  # (N2P, BA): Yᵀ, rows in _pair_rows order
        yb = _mma(zt, l_b, F32_DOT)  # (N2P, BB)
        # per-row ranges of the blocks merged, then one cross-warp reduction of both ends (instead of one per
        # block and end)
        row_hi = tl.maximum(tl.max(ya, axis=1), tl.max(yb, axis=1))  # (N2P,)
        row_lo = tl.minimum(tl.min(ya, axis=1), tl.min(yb, axis=1))
        if NBLK == 3:
            yc = _mma(zt, l_c, F32_DOT)  # (N2P, BC)
            row_hi = tl.maximum(row_hi, tl.max(yc, axis=1))
            row_lo = tl.minimum(row_lo, tl.min(yc, axis=1))
        y_hi, y_lo = tl.reduce((row_hi, row_lo), 0, _hi_lo)
        y_hi = tl.maximum(y_hi, 0.0)
        y_lo = tl.minimum(y_lo, 0.0)
        for g in tl.static_range(G):
            scale = _lac_scale(y_hi, y_lo, clip_lo, clip_hi, gg, g, QMAX)
            fast_ok = _fast_scales(scale, tl.maximum(y_hi, -y_lo))
            tl.store(s_ptr + g * stride_sg + t, scale)
            q_base = q_ptr + g * stride_qg + t * stride_qt
            _store_codes_t(_codes(ya, scale, fast_ok, QMAX, True, INTERPRET), q_base, n1, n2, 0, BA, N2P, PACK)
            _store_codes_t(_codes(yb, scale, fast_ok, QMAX, True, INTERPRET), q_base, n1, n2, BA, BB, N2P, PACK)
            if NBLK == 3:
                _store_codes_t(_codes(yc, scale, fast_ok, QMAX, True, INTERPRET), q_base, n1, n2, BA + BB, BC, N2P,
                               PACK)


@triton.jit
def _kron_right_kernel(
    x_ptr, u_ptr, r_ptr, z_ptr, ROWS, n2,
    BM: tl.constexpr, N2P: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, PDL: tl.constexpr = False,
):
    # First pass of the two-pass layout (many tokens): Z = X R for every token row at once, X viewed as
    # (T·n1, n2) (row-major tokens: row r is row r % n1 of token r // n1), BM rows per step, R loaded once per
    # program; Z rounded to x's dtype, the documented 16-bit intermediate the left product reads.
    j = tl.arange(0, N2P)
    col_ok = j < n2
    r = tl.load(r_ptr + j[:, None] * n2 + j[None, :], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    pdl_wait(PDL)
    for blk in range(tl.program_id(0), tl.cdiv(ROWS, BM), tl.num_programs(0)):
        rows = blk * BM + tl.arange(0, BM)
        mask = (rows < ROWS)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * n2 + j[None, :]
        x = _load_act(x_ptr, u_ptr, offs, mask, HAS_GLU, INTERPRET_BF16)
        z = _rounded(_mma(x, r, F32_DOT), z_ptr.dtype.element_ty, INTERPRET_BF16)
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kron_cols_kernel(
    x_ptr, u_ptr, l_ptr, r_ptr, ws_ptr, mm_ptr, nw_ptr, n1, n2, stride_xt, eps,
    N1P: tl.constexpr, N2P: tl.constexpr, BJ: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, F32_DOT: tl.constexpr, HAS_GLU: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # Split transform (few tokens): program (t, c) computes column block c of token t's Y into ws_ptr
    # ((T, N1P, N2P) fp32) and its max / min into mm_ptr ((T, NB, 2) fp32); _kron_finish_kernel quantizes.
    # HAS_NORM (with HAS_RIGHT): every program normalises the whole token it loads (the same bits in each).
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    i = tl.arange(0, N1P)
    row_ok = i < n1
    lt = _load_lt(l_ptr, n1, i, row_ok, x_ptr.dtype.element_ty, N1P, HAS_LEFT)
    if HAS_NORM:
        nw = _load_norm_weight(nw_ptr, n2, i, row_ok, N2P)
    pdl_wait(PDL)
    if HAS_RIGHT:
        x = _load_token(x_ptr, u_ptr, t, stride_xt, n2, i, row_ok, N2P, HAS_GLU, INTERPRET_BF16)
        if HAS_NORM:
            x = _rms_norm_tile(x, nw, n1 * n2, eps, INTERPRET_BF16)
    else:
        x = tl.zeros((N1P, N2P), dtype=x_ptr.dtype.element_ty)  # unused
    y = _y_cols(x, x_ptr, u_ptr, lt, r_ptr, t, stride_xt, n1, n2, c * BJ, i, row_ok, N2P, BJ, HAS_LEFT, HAS_RIGHT,
                F32_DOT, HAS_GLU, INTERPRET_BF16)
    jb = tl.arange(0, BJ)
    tl.store(ws_ptr + t * (N1P * N2P) + i[:, None] * N2P + (c * BJ + jb)[None, :], y)
    NB: tl.constexpr = N2P // BJ
    tl.store(mm_ptr + (t * NB + c) * 2, tl.max(tl.max(y, axis=1), axis=0))
    tl.store(mm_ptr + (t * NB + c) * 2 + 1, tl.min(tl.min(y, axis=1), axis=0))


@triton.jit
def _kron_finish_kernel(
    ws_ptr, mm_ptr, clip_ptr, q_ptr, s_ptr, n1, n2, stride_qt, stride_qg, stride_sg,
    N1P: tl.constexpr, N2P: tl.constexpr, BJ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    QMAX: tl.constexpr, PACK: tl.constexpr, PDL: tl.constexpr = False,
):
    # Program (t, c): token t's range from the NB block ranges, then the codes of column block c.
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    NB: tl.constexpr = N2P // BJ
    b = tl.arange(0, NB)
    y_hi = tl.maximum(tl.max(tl.load(mm_ptr + (t * NB + b) * 2), axis=0), 0.0)
    y_lo = tl.minimum(tl.min(tl.load(mm_ptr + (t * NB + b) * 2 + 1), axis=0), 0.0)
    i = tl.arange(0, N1P)
    row_ok = i < n1
    jb = tl.arange(0, BJ)
    y = tl.load(ws_ptr + t * (N1P * N2P) + i[:, None] * N2P + (c * BJ + jb)[None, :])
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    _quant_cols(y, y_hi, y_lo, clip_lo, clip_hi, gg, q_ptr, s_ptr, t, n2, c * BJ, i, row_ok, stride_qt, stride_qg,
                stride_sg, c == 0, N1P, BJ, G, QMAX, PACK)


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


def _check_up(x: Tensor, up: Tensor | None) -> None:
    if up is not None and (up.shape != x.shape or up.dtype != x.dtype):
        raise ValueError(f"up must match the gate x ({tuple(x.shape)}, {x.dtype}), got {tuple(up.shape)}, {up.dtype}")


def _check_norm(x: Tensor, norm: Tensor | None, up: Tensor | None) -> None:
    if norm is not None and (norm.dim() != 1 or norm.shape[0] != x.shape[1] or up is not None):
        raise ValueError(f"norm must be ({x.shape[1]},) and excludes up, got {tuple(norm.shape)} "
                         f"(up given: {up is not None})")


def _check_clips(clips: Tensor) -> None:
    if clips.dim() != 2 or clips.shape[1] != 2 or clips.shape[0] < 1:
        raise ValueError(f"clips must be (G, 2) with G >= 1, got {tuple(clips.shape)}")


def grid_programs(device: torch.device) -> int:
    """Default grid cap: 4 programs per SM on CUDA (3 on CPU, so the interpreter exercises the token loop)."""
    if device.type != "cuda":
        return 3
    return 4 * sm_count(device)


VARIANTS = ("whole", "chunked", "split", "two_pass", "pipelined", "pipelined_fastq", "multi_token",
            "multi_token_split", "multi_token_pipe")
PIPELINED = ("pipelined", "pipelined_fastq", "multi_token", "multi_token_split",
             "multi_token_pipe")  # need both factors (else whole)
SPLIT_MAX_T = 16  # tokens up to which large transforms are split across programs (decode)
SPLIT_MIN_ELEMS = 64 * 128  # padded n1 x n2 from which the split pays for its second launch
PIPELINE_MIN_T = 128  # tokens from which the pipelined, division-free layouts are the default (prefill)
MULTI_TOKEN_TILE = 128  # padded n1 = n2 at which multi_token is the prefill default (the measured tile; larger tiles
# would need more shared memory per cp.async stage than an SM has with the SwiGLU input: pipelined_fastq there)
# multi_token's default launch (H200, bench/results/probe_kron_h200_s7.json): one token per block, loads left to a
# 3-stage cp.async pipeline (no register prefetch), 8 warps, one program per SM; larger blocks hit the 255-register
# cap and were slower (K=14336, 2048 tokens: 75.7 us with 2 tokens, 176.6 with 4, against 61.0).
MULTI_TOKEN_BLOCK, MULTI_TOKEN_STAGES, MULTI_TOKEN_PROGRAMS_PER_SM = 1, 3, 1


def row_split_blocks(n1: int, n1p: int) -> int:
    """Row blocks of the ``multi_token_split`` layout for ``n1`` rows padded to ``n1p``: 2 (``n1p/2 + n1p/4``) for
    ``n1 <= 3/4 n1p``, 3 (``+ n1p/8``) for ``n1 <= 7/8 n1p``, else 0 (no saving: ``multi_token`` runs instead);
    blocks are at least 16 rows (the smallest tl.dot side)."""
    if 4 * n1 <= 3 * n1p and n1p >= 64:
        return 2
    if 8 * n1 <= 7 * n1p and n1p >= 128:
        return 3
    return 0


def default_variant(t: int, n1: int, n2: int) -> str:
    """The kernel layout :func:`kron_quant_triton` uses by default for ``t`` tokens of ``n1 x n2`` (see there).

    Measured on the H200 (``bench/probe_kron.py``): at 1 and 16 tokens the split layout takes 5.4 / 6.1 us for the
    14336 transform against 14.2 / 14.6 for whole (11008: 5.9 vs 15.1); at K = 4096 and for the o_proj head mix
    whole is best (bench/results/probe_kron_h200.json). From ``PIPELINE_MIN_T`` tokens with both factors,
    pipelined_fastq (bench/results/probe_kron_h200_s6.json; the same codes as whole at every size): at 2048 /
    32768 tokens 66.9 / 883 us against whole's 152.8 / 2384 for the 14336 transform, 144.9 / 1971 against
    207.3 / 3273 with down_proj's SwiGLU input, 13.2 / 170 against 17.7 / 252 at K = 4096. (Between 17 and
    ``PIPELINE_MIN_T`` tokens it was not measured: whole.) For factors that pad to ``MULTI_TOKEN_TILE``,
    multi_token with its default launch (bench/results/probe_kron_h200_s7.json, side by side with
    pipelined_fastq; codes equal whole's): 2048 / 32768 tokens 61.0 / 861 us against 65.8 / 879 for the 14336
    transform, 98.4 / 1435 against 144.9 / 1969 with the SwiGLU input, 60.2 / 873 against 69.9 / 855 at 11008.
    """
    if t <= SPLIT_MAX_T and next_pow2(n1) * next_pow2(n2) >= SPLIT_MIN_ELEMS:
        return "split"
    if t >= PIPELINE_MIN_T and n1 > 1 and n2 > 1:
        return "multi_token" if next_pow2(n1) == next_pow2(n2) == MULTI_TOKEN_TILE else "pipelined_fastq"
    return "whole"


def kron_quant_triton(
    x: Tensor,  # (T, n1 * n2) fp16/bf16
    left: Tensor | None,  # (n1, n1) x.dtype
    right: Tensor | None,  # (n2, n2) x.dtype
    clip: Tensor,  # (2,) or (G, 2) fp32: [lo factor, hi factor] per clip pair
    n1: int,
    bits: int = 4,
    pack: bool = True,
    up: Tensor | None = None,  # (T, n1 * n2) x.dtype
    programs: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    variant: str | None = None,
    block_cols: int | None = None,
    *,
    norm: Tensor | None = None,  # (n1 * n2,)
    eps: float = 0.0,
    block_tokens: int | None = None,
    prefetch: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton launcher of :func:`kron_quant` / :func:`kron_quant_multi` (interpreter on CPU tensors).

    Returns ``(codes, scale)``: ``(T, n/2)`` / ``(T,)`` for a ``(2,)`` clip, ``(G, T, n/2)`` / ``(G, T)`` for a
    ``(G, 2)`` clip (the transform runs once per token either way).

    Kernel layouts (``variant``, default :func:`default_variant`; all give the same codes):

    * ``"whole"``: one program per token (looping over its share of the tokens) holds the token's whole
      ``Y = Lᵀ X R`` in registers;
    * ``"chunked"``: the same grid, but Y is built ``block_cols`` columns at a time and parked in fp32 in an
      L2-resident per-program workspace before it is quantized (smaller register tiles for large factors, many
      tokens);
    * ``"split"``: few tokens: program (t, c) computes column block c of token t (all programs run at once instead
      of one per token), a second kernel reduces the block ranges and writes the codes;
    * ``"two_pass"``: many tokens, both factors: ``Z = X R`` for all token rows at once (one GEMM-like pass, rounded
      to x's dtype as the fused kernels round it), then the left product, clip and quantization on Z (``whole``).
    * ``"pipelined"``: many tokens, both factors: ``whole`` with both factors loaded once per program and the next
      token's loads issued before the current token is transformed and quantized (other factor sets: ``whole``);
    * ``"pipelined_fastq"``: ``pipelined`` with the codes computed without a per-element division (a reciprocal
      and an exact FMA correction, see ``_quotient_fast``) and rounded by one conversion instruction.
    * ``"multi_token"``: ``pipelined_fastq`` over blocks of ``block_tokens`` tokens (a power of two): one right
      product for the block's stacked ``(block_tokens · n1, n2)`` rows, one left product with the block's ``X R``
      tiles side by side, per-token ranges and codes; ``prefetch``: the next block is loaded into registers
      before this block is transformed (else the loads are left to the compiler's pipelining over
      ``num_stages``, into shared memory); left as ``None``: one token per block,
      no register prefetch, 3 stages, one program per SM (measured best, see :func:`default_variant`).
    * ``"multi_token_split"``: ``multi_token`` at one token per block for an ``n1`` that pads badly, its rows in
      blocks of ``n1p/2 + n1p/4`` (``n1 <= 3/4 n1p``: 86 -> 64 + 32 of 128) or ``n1p/2 + n1p/4 + n1p/8``
      (``n1 <= 7/8 n1p``: 112 -> 64 + 32 + 16) instead of the padded ``n1p`` (:func:`row_split_blocks`; otherwise
      ``multi_token`` runs). The products run transposed, ``Zᵀ = Rᵀ Xᵀ`` per row block and ``Yᵀ = Zᵀ L`` per
      column block of ``L`` (the MMA's M is ``n2p``, so wgmma needs ``n2p >= 64``, not the blocks), the left
      product reducing over the whole padded ``n1`` in one dot so that every sum has whole's terms in whole's
      order: the codes are whole's bit for bit in the interpreter. Same launch defaults as ``multi_token`` (8
      warps, 3 stages, one program per SM). Opt-in until timed on a GPU (``bench/probe_kron.py``): the offline
      sm_90 compile has 10 % fewer issued instructions per token than ``multi_token`` at 86 rows (15 % with the
      SwiGLU input) and 25 % fewer MMA flops, but 7.5 % more instructions at 112 rows (12.5 % fewer flops).
    * ``"multi_token_pipe"``: ``multi_token`` at one token per block, software-pipelined across the program's
      tokens so that the right product ``X R`` of the token after next runs on the tensor cores during the
      current token's range, codes and stores (its wgmma is waited for only by the next token's left product; see
      ``_kron_quant_pipemma_kernel`` for what it takes in Triton 3.6). ``prefetch`` (default: without ``up``):
      the tokens are loaded one iteration ahead into registers (else each iteration's load latency precedes its
      left product). The same codes as whole's bit for bit in the interpreter. Launch: 8 warps, one program per
      SM and ``num_stages=1`` (without prefetch, 2-3 stages let the compiler's loop pipelining undo the overlap).
      Opt-in until timed on a GPU (``bench/probe_kron.py``). Offline sm_90 compile (Triton 3.6, 8 warps, 128 x 128
      tiles), per warp and token: 1044 instructions without prefetch, 1130-1138 with (multi_token: 1044-1055),
      2074 / 2260 with the SwiGLU input (2049), all but 51-83 of them issued while a wgmma is in flight
      (multi_token: 13-15), one wgmma wait instead of two; but 255 registers with spills: 88 bytes without
      prefetch, 168-196 with, 104 / 812-892 with the SwiGLU input (multi_token: 207-217 registers, none); all
      at one clip pair (down_proj's sites): with three, or the in-kernel norm, 0.5-1.8 KB (multi_token: 0-92).

    ``up``: see :func:`kron_quant` (``x`` is then the SwiGLU gate). ``norm``, ``eps``: see :func:`kron_quant_multi`
    (in the kernel for the whole, chunked, split, pipelined and the three multi_token layouts with a right factor,
    else a separate RMSNorm first). ``programs`` caps the grid of the looping layouts (default 4 per SM on CUDA; for
    multi_token, programs of ``block_tokens`` tokens each; one per SM for multi_token_split and multi_token_pipe);
    ``block_cols`` (power of two >= 16; default 16 split, 32 chunked) is the column block; ``num_warps`` (default 8
    at up to 64 tokens, for the multi_token layouts and for the pipelined layouts with ``up``, else 4) and
    ``num_stages`` (default 1; multi_token's and multi_token_split's see above) are Triton launch options (CUDA
    only).
    """
    _check(x, left, right, n1, bits, pack)
    _check_up(x, up)
    _check_norm(x, norm, up)
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    if block_tokens is not None and (block_tokens < 1 or block_tokens & (block_tokens - 1)):
        raise ValueError(f"block_tokens must be a power of two, got {block_tokens}")
    t, n = x.shape
    n2 = n // n1
    variant = variant or default_variant(t, n1, n2)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "multi_token" and (block_tokens is not None
                                     or (prefetch is not None and variant != "multi_token_pipe")):
        raise ValueError(f"block_tokens and prefetch apply to the multi_token layout only (prefetch also to "
                         f"multi_token_pipe; this call runs {variant!r})")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if (variant == "two_pass" or variant in PIPELINED) and (left is None or right is None):
        variant = "whole"  # one product: nothing to split into passes / the pipelined kernel needs both factors
    if block_cols is not None and (block_cols < 16 or block_cols & (block_cols - 1)):
        raise ValueError(f"block_cols must be a power of two >= 16, got {block_cols}")
    # Both products reduce over a padded factor side; a bf16/fp16 tl.dot with a reduction side of 16 gave wrong
    # results on the H200 (Triton 3.6, see kv_attention.py), so on CUDA the sides are at least 32.
    n1p, n2p = next_pow2(n1, floor=16 if on_cpu(x) else 32), next_pow2(n2, floor=16 if on_cpu(x) else 32)
    if variant == "multi_token_split" and not row_split_blocks(n1, n1p):
        variant = "multi_token"  # n1 fills its padded tile: nothing to split
    if variant in ("multi_token_split", "multi_token_pipe"):
        num_stages = num_stages or (1 if variant == "multi_token_pipe" else MULTI_TOKEN_STAGES)
        if programs is None and x.device.type == "cuda":
            programs = MULTI_TOKEN_PROGRAMS_PER_SM * sm_count(x.device)
    if variant == "multi_token":
        block_tokens = block_tokens or MULTI_TOKEN_BLOCK
        prefetch = False if prefetch is None else prefetch
        num_stages = num_stages or (1 if prefetch else MULTI_TOKEN_STAGES)
        if programs is None and x.device.type == "cuda":
            programs = MULTI_TOKEN_PROGRAMS_PER_SM * sm_count(x.device)
    num_stages = num_stages or 1
    multi = clip.dim() == 2
    clips = clip.float().reshape(-1, 2).contiguous()
    g = clips.shape[0]
    x = x.contiguous()
    left = left.to(x.dtype).contiguous() if left is not None else None
    right = right.to(x.dtype).contiguous() if right is not None else None
    # A single clip pair gets 2-D outputs of its own (a view of a 3-D buffer would be cloned by the custom op).
    lead = (g, t) if multi else (t,)
    codes = torch.empty(*lead, n // 2 if pack else n, dtype=torch.uint8 if pack else torch.int8, device=x.device)
    scale = torch.empty(*lead, dtype=torch.float32, device=x.device)
    if t == 0:
        return codes, scale
    stride_qg, stride_sg = (codes.stride(0), scale.stride(0)) if multi else (0, 0)
    cpu = on_cpu(x)
    # H200 (bench/results/probe_decode_h200.json): 8 warps at a few tokens (K=14336: 18.4 vs 20.6 us at one
    # token), 4 warps with 4 programs per SM at many (K=14336, 32768 tokens: 2.21 vs 3.36 ms); the pipelined
    # layouts (probe_kron_h200_s6.json): 4 warps, but 8 with the SwiGLU input (2048 tokens: 144.9 vs 164.7 us).
    # multi_token: 8 warps, so that a block's fp32 tiles (block_tokens x 64 KiB at 128 x 128) fit the registers.
    warps = num_warps or (8 if t <= 64 or (up is not None and variant in PIPELINED)
                          or variant in ("multi_token", "multi_token_split", "multi_token_pipe") else 4)
    extra = launch_options(x.device, t, num_warps=warps, num_stages=num_stages)
    lp, rp = left if left is not None else x, right if right is not None else x
    flags = {"HAS_LEFT": left is not None, "HAS_RIGHT": right is not None,
             "F32_DOT": cpu or x.dtype == torch.float32, "HAS_GLU": up is not None,
             "INTERPRET_BF16": cpu and x.dtype == torch.bfloat16}
    up_p = up.contiguous() if up is not None else x
    quant = {"G": g, "GP": next_pow2(g, floor=2), "QMAX": 2 ** (bits - 1) - 1, "PACK": pack}
    if norm is not None and (right is None or variant == "two_pass"):
        x, norm = rms_norm(x, norm, eps).contiguous(), None  # the kernels normalise only whole tokens they load
    nw = norm.contiguous() if norm is not None else x
    if variant == "two_pass":
        z = torch.empty_like(x)
        bm = 64 if cpu else 128
        right_k = cpu_kernel(_kron_right_kernel) if cpu else _kron_right_kernel
        right_k[(min(triton.cdiv(t * n1, bm), programs or grid_programs(x.device)),)](
            x, up_p, rp, z, t * n1, n2, BM=bm, N2P=n2p, F32_DOT=flags["F32_DOT"], HAS_GLU=flags["HAS_GLU"],
            INTERPRET_BF16=flags["INTERPRET_BF16"], **extra)
        return kron_quant_triton(z, left, None, clip, n1, bits, pack, None, programs, num_warps, num_stages,
                                 "whole")
    if variant == "split":
        bj = min(block_cols or 16, n2p)
        nb = n2p // bj
        ws = torch.empty(t, n1p, n2p, dtype=torch.float32, device=x.device)
        mm = torch.empty(t, nb, 2, dtype=torch.float32, device=x.device)
        cols = cpu_kernel(_kron_cols_kernel) if cpu else _kron_cols_kernel
        cols[(t, nb)](x, up_p, lp, rp, ws, mm, nw, n1, n2, x.stride(0), float(eps), N1P=n1p, N2P=n2p, BJ=bj,
                      **flags, HAS_NORM=norm is not None, **extra)
        finish = cpu_kernel(_kron_finish_kernel) if cpu else _kron_finish_kernel
        finish[(t, nb)](ws, mm, clips, codes, scale, n1, n2, codes.stride(-2), stride_qg, stride_sg, N1P=n1p,
                        N2P=n2p, BJ=bj, **quant, **extra)
        return codes, scale
    grid = min(t, programs or grid_programs(x.device))
    if variant == "multi_token":
        tb_kernel = cpu_kernel(_kron_quant_tb_kernel) if cpu else _kron_quant_tb_kernel
        tb_kernel[(min(grid, triton.cdiv(t, block_tokens)),)](
            x, up_p, lp, rp, clips, codes, scale, nw, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg, stride_sg,
            float(eps), N1P=n1p, N2P=n2p, TB=block_tokens, F32_DOT=flags["F32_DOT"], HAS_GLU=flags["HAS_GLU"],
            INTERPRET_BF16=flags["INTERPRET_BF16"], **quant, HAS_NORM=norm is not None, PREFETCH=prefetch,
            INTERPRET=cpu, **extra,
        )
        return codes, scale
    if variant == "multi_token_split":
        rs_kernel = cpu_kernel(_kron_quant_rowsplit_kernel) if cpu else _kron_quant_rowsplit_kernel
        rs_kernel[(grid,)](
            x, up_p, lp, rp, clips, codes, scale, nw, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg, stride_sg,
            float(eps), N1P=n1p, N2P=n2p, NBLK=row_split_blocks(n1, n1p), F32_DOT=flags["F32_DOT"],
            HAS_GLU=flags["HAS_GLU"], INTERPRET_BF16=flags["INTERPRET_BF16"], **quant, HAS_NORM=norm is not None,
            INTERPRET=cpu, **extra,
        )
        return codes, scale
    if variant == "multi_token_pipe":
        pm_kernel = cpu_kernel(_kron_quant_pipemma_kernel) if cpu else _kron_quant_pipemma_kernel
        pm_kernel[(grid,)](
            x, up_p, lp, rp, clips, codes, scale, nw, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg, stride_sg,
            float(eps), N1P=n1p, N2P=n2p, F32_DOT=flags["F32_DOT"], HAS_GLU=flags["HAS_GLU"],
            INTERPRET_BF16=flags["INTERPRET_BF16"], **quant, HAS_NORM=norm is not None,
            PREFETCH=up is None if prefetch is None else prefetch, INTERPRET=cpu, **extra,
        )
        return codes, scale
    if variant in PIPELINED:
        pipe = cpu_kernel(_kron_quant_pipe_kernel) if cpu else _kron_quant_pipe_kernel
        pipe[(grid,)](
            x, up_p, lp, rp, clips, codes, scale, nw, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg, stride_sg,
            float(eps), N1P=n1p, N2P=n2p, F32_DOT=flags["F32_DOT"], HAS_GLU=flags["HAS_GLU"],
            INTERPRET_BF16=flags["INTERPRET_BF16"], **quant, HAS_NORM=norm is not None,
            FAST_Q=variant == "pipelined_fastq", INTERPRET=cpu, **extra,
        )
        return codes, scale
    bj = n2p if variant == "whole" else min(block_cols or 32, n2p)
    ws = torch.empty(grid, n1p, n2p, dtype=torch.float32, device=x.device) if bj < n2p else scale
    kernel = cpu_kernel(_kron_quant_kernel) if cpu else _kron_quant_kernel
    kernel[(grid,)](
        x, up_p, lp, rp, clips, codes, scale, ws, nw, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg,
        stride_sg, float(eps),
        N1P=n1p, N2P=n2p, BJ=bj, **flags, **quant, HAS_NORM=norm is not None, **extra,
    )
    return codes, scale


def kron_quant_multi_triton(
    x: Tensor, left: Tensor | None, right: Tensor | None, clips: Tensor, n1: int, bits: int = 4, pack: bool = True,
    norm: Tensor | None = None, eps: float = 0.0, **launch: Any,
) -> tuple[Tensor, Tensor]:
    """Triton launcher of :func:`kron_quant_multi`: :func:`kron_quant_triton` with ``(G, 2)`` clips only."""
    _check_clips(clips)
    return kron_quant_triton(x, left, right, clips, n1, bits, pack, norm=norm, eps=eps, **launch)


def _kron_quant_fake(x: Tensor, pack: bool, **_: object) -> tuple[Tensor, Tensor]:
    t, n = x.shape
    codes = x.new_empty(t, n // 2 if pack else n, dtype=torch.uint8 if pack else torch.int8)
    return codes, x.new_empty(t, dtype=torch.float32)


@register_op("flatquant::kron_quant", cuda=kron_quant_triton, fake=_kron_quant_fake)
def kron_quant(
    x: Tensor, left: Tensor | None, right: Tensor | None, clip: Tensor, n1: int, bits: int = 4, pack: bool = True,
    up: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per token: ``leftᵀ X right`` -> LAC clip -> symmetric ``bits`` quantization (-> int4 packing).

    Args:
        x: ``(T, n)`` fp16/bf16 activations, ``n = n1 * n2``.
        left: ``(n1, n1)`` or None; right: ``(n2, n2)`` or None (identity when None).
        clip: ``(2,)`` fp32 LAC factors ``[σ(lo logit), σ(hi logit)]`` (ones for no clipping).
        n1: the left factor size.
        bits: code width; pack: pack two codes per byte (``bits <= 4``).
        up: optional ``(T, n)`` in x's dtype: then ``x`` is the SwiGLU gate and ``X = silu(x) * up`` (in x's
            dtype, as eager PyTorch computes it), so down_proj's input is never written out.

    Returns:
        ``codes`` ``(T, n/2)`` uint8 when packed else ``(T, n)`` int8, and ``scale`` ``(T,)`` fp32.

    On Hopper at up to 8 tokens the kernels are launched with programmatic dependent launch and may read the
    factors and ``clip`` (a layer's constants) while the kernel before them drains: those must not be written by
    the kernel launched just before this op (``x`` and ``up`` may be).
    """
    _check(x, left, right, n1, bits, pack)
    _check_up(x, up)
    if up is not None:
        x = F.silu(x) * up
    return ref.kron_quant_ref(x, left, right, clip[0], clip[1], n1, bits, pack)


def _kron_quant_multi_fake(x: Tensor, clips: Tensor, pack: bool, **_: object) -> tuple[Tensor, Tensor]:
    t, n = x.shape
    g = clips.shape[0]
    codes = x.new_empty(g, t, n // 2 if pack else n, dtype=torch.uint8 if pack else torch.int8)
    return codes, x.new_empty(g, t, dtype=torch.float32)


@register_op("flatquant::kron_quant_multi", cuda=kron_quant_multi_triton, fake=_kron_quant_multi_fake)
def kron_quant_multi(
    x: Tensor, left: Tensor | None, right: Tensor | None, clips: Tensor, n1: int, bits: int = 4, pack: bool = True,
    norm: Tensor | None = None, eps: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`kron_quant` for G linears that read the same transformed activation with their own LAC pairs
    (q/k/v, gate/up): the transform runs once per token, the clip + quantize G times.

    Args:
        clips: ``(G, 2)`` fp32 LAC factors, one ``[lo, hi]`` row per linear; the rest as :func:`kron_quant`.
        norm, eps: optional ``(n,)`` RMSNorm weight and epsilon: the op then transforms
            :func:`~flatquant.core.norm.rms_norm` ``(x, norm, eps)`` (the layer's pre-attention / pre-MLP norm;
            ``x`` is the residual stream), so the normalised input is never written out.

    Returns:
        ``codes`` ``(G, T, n/2)`` uint8 (packed) or ``(G, T, n)`` int8, and ``scale`` ``(G, T)`` fp32; slice ``g``
        equals ``kron_quant(x, left, right, clips[g], n1, bits, pack)``.

    The launch note of :func:`kron_quant` holds for ``left``, ``right`` and ``clips``.
    """
    _check(x, left, right, n1, bits, pack)
    _check_clips(clips)
    _check_norm(x, norm, None)
    if norm is not None:
        x = rms_norm(x, norm, eps)
    return ref.kron_quant_multi_ref(x, left, right, clips, n1, bits, pack)
