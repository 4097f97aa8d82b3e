"""The many-token (prefill) layouts of ``flatquant::kron_quant``, launched by
:func:`flatquant.ops.kron_quant.kron_quant_triton` (whose docstring describes each layout): the first pass of
``two_pass`` (``Z = X R`` for all token rows), ``pipelined`` / ``pipelined_fastq``, ``multi_token`` and
``multi_token_split`` with the helpers of its transposed tiles. The tile helpers they share
with the other layouts are in :mod:`flatquant.ops._kron_tiles`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kron_tiles import (
    _codes,
    _fast_scales,
    _inv_rms,
    _lac_scale,
    _load_act,
    _load_clips,
    _load_factors,
    _load_norm_weight,
    _load_token,
    _load_tokens,
    _mma,
    _nibbles,
    _quant_cols,
    _quant_tokens,
    _rms_norm_tile,
    _rms_norm_tokens,
    _rms_scaled,
    _rounded,
)
from ._launch import pdl_wait


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
def _program_constants(l_ptr, r_ptr, clip_ptr, nw_ptr, n1, n2, x_dtype: tl.constexpr, N1P: tl.constexpr,
                       N2P: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, HAS_NORM: tl.constexpr,
                       PDL: tl.constexpr):
    """What the looping layouts with both factors load once per program, before the PDL wait (constant inputs):
    :func:`_load_factors`' index vector, row mask, Lᵀ and R, the RMSNorm weight tile with HAS_NORM (else an
    unused ``(1, 1)`` zero) and :func:`_load_clips`' clip pairs."""
    i, row_ok, lt, r = _load_factors(l_ptr, r_ptr, n1, n2, x_dtype, N1P, N2P)
    if HAS_NORM:
        nw = _load_norm_weight(nw_ptr, n2, i, row_ok, N2P)
    else:
        nw = tl.zeros((1, 1), dtype=tl.float32)
    gg, clip_lo, clip_hi = _load_clips(clip_ptr, G, GP)
    pdl_wait(PDL)
    return i, row_ok, lt, r, nw, gg, clip_lo, clip_hi


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
    i, row_ok, lt, r, nw, gg, clip_lo, clip_hi = _program_constants(l_ptr, r_ptr, clip_ptr, nw_ptr, n1, n2,
                                                                     x_ptr.dtype.element_ty, N1P, N2P, G, GP,
                                                                     HAS_NORM, PDL)
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
    i, row_ok, lt, r, nw, gg, clip_lo, clip_hi = _program_constants(l_ptr, r_ptr, clip_ptr, nw_ptr, n1, n2,
                                                                     x_ptr.dtype.element_ty, N1P, N2P, G, GP,
                                                                     HAS_NORM, PDL)
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
def _store_codes_t(q, q_base, n1, n2, a0, BW: tl.constexpr, N2P: tl.constexpr, PACK: tl.constexpr,
                   SAT: tl.constexpr = False):
    """Store the int32 codes ``q`` ``(N2P, BW)`` of rows ``[a0, a0 + BW)`` of a token's ``Y``, transposed with its
    rows in :func:`_pair_rows` order, at ``q_base`` (packed: element 2k in the low nibble of byte k; SAT: the
    codes saturated to 4 bits by the pack, see :func:`_nibbles`)."""
    b = a0 + tl.arange(0, BW)
    if PACK:
        # rows (16w + r, 16w + 8 + r) are columns (2(8w + r), 2(8w + r) + 1): byte 8w + r of each row of Y
        pairs = tl.reshape(tl.permute(tl.reshape(q, (N2P // 16, 2, 8, BW)), (0, 2, 3, 1)), (N2P // 2, BW, 2))
        jh = tl.arange(0, N2P // 2)
        half = n2 // 2
        tl.store(q_base + b[None, :] * half + jh[:, None], _nibbles(pairs, SAT),
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
        SAT: tl.constexpr = PACK and QMAX == 7 and not INTERPRET  # the clamp in the pack (_nibbles)
        for g in tl.static_range(G):
            scale = _lac_scale(y_hi, y_lo, clip_lo, clip_hi, gg, g, QMAX)
            fast_ok = _fast_scales(scale, tl.maximum(y_hi, -y_lo))
            tl.store(s_ptr + g * stride_sg + t, scale)
            q_base = q_ptr + g * stride_qg + t * stride_qt
            _store_codes_t(_codes(ya, scale, fast_ok, QMAX, True, INTERPRET, not SAT), q_base, n1, n2, 0, BA, N2P,
                           PACK, SAT)
            _store_codes_t(_codes(yb, scale, fast_ok, QMAX, True, INTERPRET, not SAT), q_base, n1, n2, BA, BB, N2P,
                           PACK, SAT)
            if NBLK == 3:
                _store_codes_t(_codes(yc, scale, fast_ok, QMAX, True, INTERPRET, not SAT), q_base, n1, n2, BA + BB,
                               BC, N2P, PACK, SAT)
