"""Tile helpers of the ``flatquant::kron_quant`` kernels (:mod:`flatquant.ops.kron_quant`), most shared by several
layouts: loads of a token's activations (with the SwiGLU input), of the factors, the RMSNorm weight and the clip
pairs; the in-kernel RMSNorm; the products and the roundings of their results; the LAC scales, the symmetric codes
(with the division-free quotient) and their int4 packing and stores, per column block of one token or per block of
tokens.

Triton resolves the ``triton.jit`` functions a kernel calls through the globals of the kernel's module, so each
kernel module imports every helper its kernels call by name; the helpers here call only each other and
:func:`flatquant.ops._launch.round_to_bf16_f32`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import round_to_bf16_f32


@triton.jit
def _load_act(x_ptr, u_ptr, offs, mask, HAS_GLU: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """Activations at ``offs``; with ``HAS_GLU`` ``x`` is the gate and the activation is ``silu(gate) * up`` in x's
    dtype, rounded as eager PyTorch rounds it (``silu`` in fp32 rounded to x's dtype, then the product rounded).
    ``HAS_GLU``: 0 no gate; 1 ``silu(g) = g / (1 + exp(-g))`` by Triton's ``exp`` and ``/`` (``ex2.approx`` and
    ``div.full`` on CUDA; the interpreter); 2 (CUDA only) the same function with the hardware approximations
    inline and without their range handling, ``g · rcp(1 + ex2(-g · log2 e))`` (``.ftz``: a tiny ``exp(-g)`` is
    0, which leaves ``1 + exp(-g)`` unchanged; a denominator past 2^126 flushes the reciprocal to 0, where
    ``div.full`` gives |silu| < 1e-36): 5 instructions per element instead of about 11.
    INTERPRET_BF16: the interpreter truncates fp32 -> bf16, so the roundings go through the bits."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_GLU:
        gf = x.to(tl.float32)
        if HAS_GLU == 2:
            e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [gf * -1.4426950408889634],
                                          dtype=tl.float32, is_pure=True, pack=1)
            s = gf * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                               is_pure=True, pack=1)
        else:
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
def _codes(y, scale, fast_ok, QMAX: tl.constexpr, FAST_Q: tl.constexpr, INTERPRET: tl.constexpr,
           CLAMP: tl.constexpr = True):
    """``rne(clamp(y / scale, -QMAX - 1, QMAX))`` as int32, the quotient correctly rounded; ``scale`` is a scalar
    or broadcasts against ``y``. FAST_Q: the quotient without a per-element division (:func:`_quotient_fast`, the
    same quotient; ``fast_ok``: :func:`_fast_scales` of every scale involved) and, on CUDA, one ``cvt.rni`` for
    the rounding; else, and in the interpreter, the rounding is ``(v + 1.5·2²³) − 1.5·2²³`` in fp32 (exact for
    the clamped ``|v| <= QMAX + 1``). Round half to even either way. ``CLAMP=False`` (FAST_Q on CUDA only): the
    clamp is left to a saturating pack (:func:`_nibbles`), ``cvt.rni`` itself saturating at the int32 range;
    rounding then saturating gives the clamp-then-round codes (every ``v`` past ``QMAX`` rounds to ``>= QMAX``)."""
    if FAST_Q:
        v = _quotient_fast(y, scale, fast_ok, INTERPRET)
    else:
        v = _quotient(y, scale)
    if CLAMP:
        v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX * 1.0)
    if FAST_Q and not INTERPRET:
        q = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    else:
        q = ((v + 12582912.0) - 12582912.0).to(tl.int32)
    return q


@triton.jit
def _nibbles(pairs, SAT: tl.constexpr = False):
    """Packed bytes of int32 codes whose last axis holds (even, odd) element pairs: the even element in the low
    nibble; the result drops that axis. SAT (CUDA): the codes are first saturated to [-8, 7], by the pack
    instruction itself (``cvt.pack.sat.s4``: ``d = c << 8 | sat(a) << 4 | sat(b)``), for :func:`_codes`
    without its clamp."""
    lo_q, hi_q = tl.split(pairs)
    if SAT:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 z; mov.b32 z, 0; cvt.pack.sat.s4.s32.b32 $0, $1, $2, z; }", "=r,r,r", [hi_q, lo_q],
            dtype=tl.int32, is_pure=True, pack=1).to(tl.uint8)
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
def _quant_tokens(
    y, clip_lo, clip_hi, gg, q_ptr, s_ptr, t0, T, n1, n2, stride_qt, stride_qg, stride_sg,
    TB: tl.constexpr, N1P: tl.constexpr, N2P: tl.constexpr, G: tl.constexpr, QMAX: tl.constexpr,
    PACK: tl.constexpr, FAST_Q: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Per-token range, LAC and symmetric codes of the ``(TB, N1P, N2P)`` tile ``y`` (tokens ``[t0, t0 + TB)``,
    padding 0) for each of the G clip pairs: :func:`_quant_cols` for TB tokens at once (the same codes and
    scales); tokens past ``T`` are not stored."""
    SAT: tl.constexpr = PACK and FAST_Q and QMAX == 7 and not INTERPRET  # the clamp in the pack (_nibbles)
    tok = t0 + tl.arange(0, TB).to(tl.int64)
    tok_ok = tok < T
    y_hi = tl.maximum(tl.max(tl.max(y, axis=2), axis=1), 0.0)
    y_lo = tl.minimum(tl.min(tl.min(y, axis=2), axis=1), 0.0)
    i = tl.arange(0, N1P)
    for g in tl.static_range(G):
        scale = _lac_scale(y_hi, y_lo, clip_lo, clip_hi, gg, g, QMAX)  # (TB,); 1 for tokens past T
        fast_ok = tl.min(_fast_scales(scale, tl.maximum(y_hi, -y_lo)).to(tl.int32), axis=0) > 0
        q = _codes(y, tl.broadcast_to(scale[:, None, None], (TB, N1P, N2P)), fast_ok, QMAX, FAST_Q, INTERPRET,
                   not SAT)
        tl.store(s_ptr + g * stride_sg + tok, scale, mask=tok_ok)
        q_base = q_ptr + g * stride_qg + tok[:, None, None] * stride_qt
        if PACK:
            # Flattened element 2k of a token -> low nibble of its byte k (n2 is even: pairs stay in a row).
            jh = tl.arange(0, N2P // 2)
            half = n2 // 2
            ok = (i < n1)[:, None] & (jh < half)[None, :]
            tl.store(q_base + (i[:, None] * half + jh[None, :])[None, :, :],
                     _nibbles(tl.reshape(q, (TB, N1P, N2P // 2, 2)), SAT), mask=tok_ok[:, None, None] & ok[None, :, :])
        else:
            j = tl.arange(0, N2P)
            ok = (i < n1)[:, None] & (j < n2)[None, :]
            tl.store(q_base + (i[:, None] * n2 + j[None, :])[None, :, :], q.to(tl.int8),
                     mask=tok_ok[:, None, None] & ok[None, :, :])


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
