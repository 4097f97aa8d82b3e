"""The few-token (decode) ``split`` layout of ``flatquant::kron_quant``, launched by
:func:`flatquant.ops.kron_quant.kron_quant_triton`: two kernels, one program per (token, column block) each, the
first computing a column block of a token's ``Y`` and its range, the second reducing the block ranges and writing
the codes. Tile helpers: :mod:`flatquant.ops._kron_tiles`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._kron_tiles import (
    _load_clips,
    _load_lt,
    _load_norm_weight,
    _load_token,
    _quant_cols,
    _rms_norm_tile,
    _y_cols,
)
from ._launch import pdl_wait


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
