"""Split-K small-M integer GEMM (decode: a few tokens against a large weight), all three modes of ``matmul.py``.

At M <= 16 the GEMM is bound by the weight bytes, and the tiled kernel of :mod:`flatquant.ops.matmul` launches only
``N / BLOCK_N`` programs that each walk the whole K: too few to keep HBM busy. Here the grid is
``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``; program ``(n-block, s)`` streams the weight tile rows
``[n0, n0 + BLOCK_N)`` over its own K-range (a whole number of ``BLOCK_K`` tiles) for all M rows at once.

Products run on int8 tensor cores with the operands swapped (``accᵀ (BLOCK_N, BLOCK_M) = W_tile · A_tileᵀ``, M
padded to 16, the padding rows masked off), so the unpacked weight tile is the MMA's register operand (wgmma from
registers at BLOCK_N >= 64) and the tiny token dimension is the MMA's N side. On CUDA the int4 nibbles are unpacked
four bytes per 32-bit instruction (inline PTX, :func:`_lo` / :func:`_hi`); per-byte shifts in Triton were the
bottleneck (W4A4 4096 x 4096 on the H100: 12.5 -> 7.4 us). Accumulation is exact int32. The result is
deterministic and bit-identical to :func:`flatquant.ops.reference.int_matmul_ref`:

* ``SPLIT_K == 1``: the program applies the fp32 epilogue ``(acc · s_a[m]) · s_w[n] (+ bias)`` itself.
* ``SPLIT_K > 1``: every program writes its int32 partial sums to a workspace ``(SPLIT_K, M, N)`` and a second
  small kernel sums them in int32, in a fixed order, and applies the same epilogue. The call keeps no state
  between launches (the workspace is allocated per call), so concurrent calls on several streams are safe.

* ``SPLIT_K > 1`` with caller-owned arrival counters (``counters``): the last program of each output tile to arrive
  sums the partials and applies the epilogue itself, and resets its counter, so there is no second kernel (an
  earlier H100 measurement put this at 0.3-1 us per call faster). The counters persist between calls, so they
  belong to the caller (the engine keeps one set per linear), never to this module.

Layouts are those of ``matmul.py``: W4A4 both operands interleaved packed int4 ``(M, K/2)`` / ``(N, K/2)``; W4A8
int8 activations ``(M, K)`` and ``halves``-layout weights ``(N, Kp/2)`` (tile ``W4A8_BLOCK_K``, Kp padded to it);
W8A8 int8 ``(M, K)`` / ``(N, K)``. The fp32 multiply-add of the epilogue is never contracted into an FMA
(``enable_fp_fusion=False``), so the bias case is bit-exact too.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import (
    cpu_kernel,
    dequant_epilogue,
    launch_options,
    next_pow2,
    nibble_hi,
    nibble_lo,
    on_cpu,
    pdl_wait,
    sm_count,
)
from ._modes import MODE_W4A4, MODE_W4A8, MODE_W8A8, check_operands, check_residual, halves_cols
from ._register import register_op

_MAX_BLOCK_M = 64


@triton.jit
def _lo(b, SWAR: tl.constexpr):
    """Sign-extended low nibbles of int8 bytes; ``SWAR``: four bytes per 32-bit register op (PTX, CUDA only)."""
    if SWAR:
        # (x & 0x0F..) | (x & 0x08..) * 0x1E: the nibble, plus 0xF0 in every byte whose nibble sign bit is set
        return tl.inline_asm_elementwise(
            "{.reg .b32 t; and.b32 t, $1, 0x08080808; mul.lo.u32 t, t, 30; and.b32 $0, $1, 0x0F0F0F0F; "
            "or.b32 $0, $0, t;}", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return nibble_lo(b)


@triton.jit
def _hi(b, SWAR: tl.constexpr):
    """Sign-extended high nibbles of int8 bytes; ``SWAR`` as in :func:`_lo`."""
    if SWAR:
        # (x >> 4) & 0x0F.. | ((x & 0x80..) >> 3) * 15: the nibble, plus 0xF0 where the byte's sign bit is set
        return tl.inline_asm_elementwise(
            "{.reg .b32 t; and.b32 t, $1, 0x80808080; shr.u32 t, t, 3; mul.lo.u32 t, t, 15; shr.u32 $0, $1, 4; "
            "and.b32 $0, $0, 0x0F0F0F0F; or.b32 $0, $0, t;}", "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return nibble_hi(b)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at ``ptrs`` (no data comes back; CUDA only)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _qgemv_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, p_ptr, cnt_ptr, res_ptr,
    M, N, K, KW, K_SPLIT, KB_SPLIT, SPLIT_K, stride_am, stride_wn, stride_cm, stride_ps,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF_TILE: tl.constexpr,
    EVEN_K: tl.constexpr, SWAR: tl.constexpr, INTERPRET_BF16: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = 0,
):
    # K_SPLIT / KB_SPLIT: K elements / packed bytes per split (separate arguments, so that both keep the 16-byte
    # divisibility Triton specializes on and the weight loads stay 16 bytes wide).
    # REDUCE: 0 = this program owns all of K (epilogue here), 1 = partials to the workspace (second kernel sums),
    # 2 = partials to the workspace, and the last of the tile's SPLIT_K programs to arrive (an arrival counter per
    # output tile at cnt_ptr, which that program resets to 0) sums them and applies the epilogue.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Weight rows past N are wrapped (loads stay in bounds; their results are never stored). Token rows past M
    # are masked instead: with M < BLOCK_M, wrapping would make many lanes fetch the same activation bytes.
    rm = offs_m.to(tl.int64)
    m_in = (offs_m < M)[None, :]
    rn = (offs_n % N).to(tl.int64)
    k_start = pid_s * K_SPLIT  # a multiple of BLOCK_K
    n_iter = tl.cdiv(tl.minimum(K - k_start, K_SPLIT), BLOCK_K)
    KH: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)  # accᵀ: weights are the MMA's left operand
    if PREFETCH > 0:
        # PDL: while the previous kernel drains, pull this program's first weight tiles (constant input) into L2,
        # one 128-byte line per row and tile (rows of a 4-bit tile are KH <= 128 bytes; W8A8 rows are BLOCK_K).
        ROW_BYTES: tl.constexpr = BLOCK_K if MODE == 0 else KH
        LINES: tl.constexpr = PREFETCH * ((ROW_BYTES + 127) // 128)
        col0 = k_start if MODE == 0 else pid_s * KB_SPLIT
        row_end = K if MODE == 0 else KW
        line = tl.minimum(tl.arange(0, LINES) * 128, tl.minimum(n_iter * ROW_BYTES, row_end - col0) - 1)
        _prefetch_l2(w_ptr + rn[:, None] * stride_wn + (col0 + line)[None, :])
    pdl_wait(PDL)

    if MODE == 1:
        # W4A4: a byte tile of either operand unpacks into its even-k (low) and odd-k (high) half tiles.
        kh = tl.arange(0, KH)
        kb = pid_s * KB_SPLIT
        w_ptrs = w_ptr + rn[:, None] * stride_wn + (kb + kh)[None, :]
        a_ptrs = a_ptr + rm[None, :] * stride_am + (kb + kh)[:, None]
        for i in range(0, n_iter):
            if EVEN_K:
                w = tl.load(w_ptrs)
                a = tl.load(a_ptrs, mask=m_in, other=0)
            else:
                rem = KW - kb - i * KH
                w = tl.load(w_ptrs, mask=kh[None, :] < rem, other=0)
                a = tl.load(a_ptrs, mask=(kh[:, None] < rem) & m_in, other=0)
            acc = tl.dot(_lo(w, SWAR), _lo(a, SWAR), acc, out_dtype=tl.int32)
            acc = tl.dot(_hi(w, SWAR), _hi(a, SWAR), acc, out_dtype=tl.int32)
            w_ptrs += KH
            a_ptrs += KH
    elif MODE == 2:
        # W4A8: BLOCK_K spans BLOCK_K / (2 HALF_TILE) halves-layout tiles; weight byte j of a tile holds elements j
        # (low nibble) and j + HALF_TILE (high nibble), so byte column c meets activation column a_col[c] (low)
        # and a_col[c] + HALF_TILE (high).
        kh = tl.arange(0, KH)
        a_col = (kh // HALF_TILE) * (2 * HALF_TILE) + kh % HALF_TILE
        a_col = tl.max_contiguous(tl.multiple_of(a_col, HALF_TILE), HALF_TILE)
        kb = pid_s * KB_SPLIT
        w_ptrs = w_ptr + rn[:, None] * stride_wn + (kb + kh)[None, :]
        a_ptrs = a_ptr + rm[None, :] * stride_am + (k_start + a_col)[:, None]
        for i in range(0, n_iter):
            if EVEN_K:
                w = tl.load(w_ptrs)
                a0 = tl.load(a_ptrs, mask=m_in, other=0)
                a1 = tl.load(a_ptrs + HALF_TILE, mask=m_in, other=0)
            else:
                rem = K - k_start - i * BLOCK_K
                w = tl.load(w_ptrs, mask=kh[None, :] < KW - kb - i * KH, other=0)
                a0 = tl.load(a_ptrs, mask=(a_col[:, None] < rem) & m_in, other=0)
                a1 = tl.load(a_ptrs + HALF_TILE, mask=(a_col[:, None] + HALF_TILE < rem) & m_in, other=0)
            acc = tl.dot(_lo(w, SWAR), a0, acc, out_dtype=tl.int32)
            acc = tl.dot(_hi(w, SWAR), a1, acc, out_dtype=tl.int32)
            w_ptrs += KH
            a_ptrs += BLOCK_K
    else:
        # W8A8: plain int8 tiles.
        kk = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_start + kk)[None, :]
        a_ptrs = a_ptr + rm[None, :] * stride_am + (k_start + kk)[:, None]
        for i in range(0, n_iter):
            if EVEN_K:
                w = tl.load(w_ptrs)
                a = tl.load(a_ptrs, mask=m_in, other=0)
            else:
                rem = K - k_start - i * BLOCK_K
                w = tl.load(w_ptrs, mask=kk[None, :] < rem, other=0)
                a = tl.load(a_ptrs, mask=(kk[:, None] < rem) & m_in, other=0)
            acc = tl.dot(w, a, acc, out_dtype=tl.int32)
            w_ptrs += BLOCK_K
            a_ptrs += BLOCK_K

    if REDUCE == 0:
        dequant_epilogue(tl.trans(acc), offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm,
                         HAS_BIAS, INTERPRET_BF16, res_ptr, HAS_RES)
    else:
        # Workspace (SPLIT_K, M, N) int32, written as accᵀ.
        ok = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tile = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(p_ptr + pid_s.to(tl.int64) * stride_ps + tile, acc, mask=ok)
        if REDUCE == 2:
            # Every thread's partial is stored before the arrival is counted (barrier; the atomic releases at GPU
            # scope); the last arrival acquires the others' partials. Integer sums: any order gives the same bits.
            tl.debug_barrier()
            tile_id = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
                for s in range(0, SPLIT_K):
                    total += tl.load(p_ptr + s * stride_ps + tile, mask=ok, other=0, cache_modifier=".cg")
                dequant_epilogue(tl.trans(total), offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm,
                                 HAS_BIAS, INTERPRET_BF16, res_ptr, HAS_RES)
                tl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit
def _qgemv_reduce_kernel(
    p_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr, res_ptr, M, N, SPLIT_K, stride_cm, stride_ps,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET_BF16: tl.constexpr, PDL: tl.constexpr = False,
):
    # Sums the SPLIT_K int32 partials of a (BLOCK_M, BLOCK_N) tile in a fixed order, then the fp32 epilogue.
    pdl_wait(PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = p_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, SPLIT_K):
        acc += tl.load(ptrs, mask=ok, other=0)
        ptrs += stride_ps
    dequant_epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS, INTERPRET_BF16,
                     res_ptr, HAS_RES)


def default_blocks(mode: int, device: torch.device) -> tuple[int, int]:
    """Default ``(BLOCK_N, BLOCK_K)``: 128 weight bytes per row and K-step on CUDA (32 x 128 under the interpreter)."""
    if device.type != "cuda":
        return 32, 128
    return 64, (128 if mode == MODE_W8A8 else 256)


def default_split_k(n_tiles: int, k: int, block_k: int, sms: int) -> int:
    """Default number of K splits for ``n_tiles`` output tiles (N-blocks times M-blocks) on ``sms`` SMs.

    The smallest power of two that gives at least 1.5 programs per SM (doubling from below lands in [1.5, 3) per
    SM), but never fewer than 2 K-tiles of ``block_k`` per program, so that the loads can still be pipelined.
    Measured on an H100 (``bench/probe_gemm.py``, M <= 16, LLaMA-3-8B shapes): 1.7-1.9 programs per SM were
    fastest; twice that was 5-10% slower (more partial sums, shorter K loops).
    """
    k_tiles = triton.cdiv(k, block_k)
    max_split = max(1, k_tiles // 2)
    split = 1
    while split < max_split and 2 * n_tiles * split < 3 * sms:
        split *= 2
    return min(split, max_split)


def default_prefetch(pdl: bool) -> int:
    """Weight K-tiles per program that the GEMV asks L2 for before it waits on the previous kernel, for a launch
    with programmatic dependent launch (``pdl``): 2, which ``FLATQUANT_GEMV_PREFETCH`` overrides (read at each
    launch); 0 without PDL, where no previous kernel is draining."""
    if not pdl:
        return 0
    env = os.environ.get("FLATQUANT_GEMV_PREFETCH")
    return 2 if env is None else int(env)


def default_block_n(mode: int, n: int, m_blocks: int, device: torch.device) -> int:
    """Default ``BLOCK_N``: :func:`default_blocks`' width, doubled to 128 for W4A4 on CUDA when 64-wide tiles would
    already give 3 or more programs per SM without a K split (H200 sweep at one token, cold weights,
    ``bench/results/probe_gemv_sweep_h200.json``: gate/up 4096 -> 28672 took 24.9 us at 64 and 19.7 us at 128;
    the narrower shapes were fastest at 64 with a split)."""
    block_n = default_blocks(mode, device)[0]
    if mode == MODE_W4A4 and device.type == "cuda" and triton.cdiv(n, block_n) * m_blocks >= 3 * sm_count(device):
        return 2 * block_n
    return block_n


def counter_slots(n: int, device: torch.device, m: int = 1) -> int:
    """Arrival counters that :func:`qgemv_triton` needs for ``N = n`` outputs and ``m`` rows (default blocks)."""
    m_blocks = triton.cdiv(m, min(next_pow2(m), _MAX_BLOCK_M))
    return triton.cdiv(n, default_block_n(MODE_W4A4, n, m_blocks, device)) * m_blocks


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """``(tiles_per_split, splits)``: K-tiles of ``block_k`` per program and the effective number of K splits.

    Every split but the last covers ``tiles_per_split`` whole tiles and none is empty, so ``splits <= split_k``.
    """
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    k_tiles = triton.cdiv(k, block_k)
    tiles_per_split = max(1, triton.cdiv(k_tiles, split_k))
    return tiles_per_split, max(1, triton.cdiv(k_tiles, tiles_per_split))


def qgemv_triton(
    a: Tensor,  # (M, K/2) uint8 (MODE_W4A4) or (M, K) int8
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, K/2) uint8 interleaved (W4A4), (N, Kp/2) uint8 halves (W4A8), or (N, K) int8 (W8A8)
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    k: int,
    mode: int,
    out_dtype: torch.dtype,
    split_k: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    *,
    num_warps: int = 4,
    num_stages: int = 4,
    swar: bool = True,
    counters: Tensor | None = None,
    prefetch: int | None = None,
    residual: Tensor | None = None,  # (M, N) out_dtype
) -> Tensor:  # (M, N)
    """Split-K integer GEMM for few tokens; same operands and bit-identical results as ``qmatmul_triton``.

    Args:
        a, a_scale, w, w_scale, bias, k, mode, out_dtype: as :func:`flatquant.ops.matmul.qmatmul_triton`.
        split_k: number of K ranges (default :func:`default_split_k`); rounded so that every range is a whole
            number of ``block_k`` tiles and none is empty (the effective count can be lower).
        block_n: output features per program (power of two >= 16; default :func:`default_blocks`).
        block_k: K elements per loop step (power of two >= 32; a multiple of ``W4A8_BLOCK_K`` for W4A8).
        num_warps, num_stages: Triton launch options (CUDA only).
        swar: unpack int4 nibbles four bytes per 32-bit instruction (inline PTX; CUDA only, the interpreter always
            uses the per-byte shifts).
        counters: optional int32 arrival counters, at least :func:`counter_slots` of them, all 0 (as allocated, and
            as every call leaves them): with a K split, the last program of each output tile sums the partials and
            applies the epilogue (no second kernel). The caller owns them; calls that share counters must not
            overlap (one stream, or one CUDA graph). Same result as without.
        prefetch: weight K-tiles per program requested into L2 before the kernel waits for the previous one
            (programmatic dependent launch; default :func:`default_prefetch`; always 0 under the interpreter).
        residual: added to the result in the epilogue (the sum rounded as ``out + residual`` in ``out_dtype``
            rounds it): a decode layer's residual stream, without a kernel of its own.

    CPU tensors run through Triton's interpreter.
    """
    if mode not in (MODE_W8A8, MODE_W4A4, MODE_W4A8):
        raise ValueError(f"unknown mode {mode}")
    a_cols, w_cols = {MODE_W4A4: (k // 2, k // 2), MODE_W4A8: (k, halves_cols(k)), MODE_W8A8: (k, k)}[mode]
    if a.dim() != 2 or a.shape[1] != a_cols:
        raise ValueError(f"activations must be (M, {a_cols}) for K={k} in this mode, got {tuple(a.shape)}")
    check_operands(a, a_scale, w, w_scale, k, w_cols)
    m, n = a.shape[0], w.shape[0]
    check_residual(residual, m, n, out_dtype)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    dev = a.device
    res = residual.contiguous() if residual is not None else out
    cpu = on_cpu(a)
    block_m = min(next_pow2(m), _MAX_BLOCK_M)
    m_blocks = triton.cdiv(m, block_m)
    block_n = block_n or default_block_n(mode, n, m_blocks, dev)
    block_k = block_k or default_blocks(mode, dev)[1]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 32, got {block_k}")
    if mode == MODE_W4A4 and block_k < 64:
        raise ValueError(f"W4A4 needs block_k >= 64 (an int8 dot of at least 32 per nibble half), got {block_k}")
    if mode == MODE_W4A8 and block_k % ref.W4A8_BLOCK_K:
        raise ValueError(f"W4A8 needs block_k to be a multiple of {ref.W4A8_BLOCK_K}, got {block_k}")
    n_blocks = triton.cdiv(n, block_n)
    if split_k is None:
        split_k = default_split_k(n_blocks * m_blocks, k, block_k, sm_count(dev))
    tiles_per_split, split = split_plan(k, block_k, split_k)

    a = a.contiguous().view(torch.int8)
    w = w.contiguous().view(torch.int8)
    sa = a_scale.float().contiguous()
    sw = w_scale.float().contiguous()
    b = bias.contiguous() if bias is not None else sa
    interpret_bf16 = cpu and out_dtype == torch.bfloat16
    red = 0 if split == 1 else (1 if counters is None else 2)
    if red == 2:
        assert counters is not None
        if counters.dtype != torch.int32 or counters.device != dev or counters.numel() < n_blocks * m_blocks:
            raise ValueError(f"counters must be int32 on {dev} with at least {n_blocks * m_blocks} slots, got "
                             f"{counters.dtype} on {counters.device} with {counters.numel()}")
    ws = out if split == 1 else torch.empty(split, m, n, dtype=torch.int32, device=dev)
    opts = launch_options(dev, m, num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    prefetch = default_prefetch(opts["PDL"]) if prefetch is None else (0 if cpu else prefetch)
    if prefetch < 0 or prefetch & (prefetch - 1):
        raise ValueError(f"prefetch must be 0 or a power of two, got {prefetch}")
    kernel = cpu_kernel(_qgemv_kernel) if cpu else _qgemv_kernel
    kernel[(n_blocks, split, m_blocks)](
        a, w, sa, sw, b, out, ws, counters if red == 2 else ws, res, m, n, k, w.shape[1], tiles_per_split * block_k,
        tiles_per_split * block_k // 2, split, a.stride(0), w.stride(0), out.stride(0), m * n, MODE=mode,
        HAS_BIAS=bias is not None, REDUCE=red, HAS_RES=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HALF_TILE=ref.W4A8_BLOCK_K // 2, EVEN_K=k % block_k == 0,
        SWAR=not cpu and swar, INTERPRET_BF16=interpret_bf16, PREFETCH=prefetch, **opts)
    if red == 1:
        rbm = min(next_pow2(m, floor=1), 16)
        rbn = min(256, max(32, 1024 // rbm))
        reduce_kernel = cpu_kernel(_qgemv_reduce_kernel) if cpu else _qgemv_reduce_kernel
        ropts = launch_options(dev, m, num_warps=4, enable_fp_fusion=False)
        reduce_kernel[(triton.cdiv(n, rbn), triton.cdiv(m, rbm))](
            ws, sa, sw, b, out, res, m, n, split, out.stride(0), m * n, HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, BLOCK_M=rbm, BLOCK_N=rbn,
            INTERPRET_BF16=interpret_bf16, **ropts)
    return out


def w4a4_gemv_triton(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                     out_dtype: torch.dtype, counters: Tensor,
                     residual: Tensor | None = None) -> Tensor:  # (M, K/2) packed codes -> (M, N)
    """Triton launcher of :func:`w4a4_gemv` (interpreter on CPU tensors)."""
    return qgemv_triton(a, a_scale, w, w_scale, bias, a.shape[1] * 2, MODE_W4A4, out_dtype, counters=counters,
                        residual=residual)


def _w4a4_gemv_fake(a: Tensor, w: Tensor, out_dtype: torch.dtype, **_: object) -> Tensor:
    return a.new_empty(a.shape[0], w.shape[0], dtype=out_dtype)


@register_op("flatquant::w4a4_gemv", cuda=w4a4_gemv_triton, fake=_w4a4_gemv_fake, mutates_args=("counters",))
def w4a4_gemv(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
              counters: Tensor, residual: Tensor | None = None) -> Tensor:
    """:func:`~flatquant.ops.w4a4_matmul` for few tokens (decode) through the split-K kernel with the caller's
    arrival counters, so the K split is reduced inside the kernel (see :func:`qgemv_triton`).

    Args:
        a, a_scale, w, w_scale, bias, out_dtype: as ``w4a4_matmul``.
        counters: int32, at least ``counter_slots(N, device, M)`` slots, all 0; every call leaves them at 0. Owned
            by the caller (e.g. one set per linear of a model); calls sharing them must not overlap.
        residual: optional ``(M, N)`` in ``out_dtype``, added in the epilogue (a decode layer's residual stream).

    Returns:
        ``(M, N)`` in ``out_dtype``, bit-identical to ``w4a4_matmul`` (``+ residual`` in ``out_dtype``).
    """
    k = a.shape[1] * 2
    check_operands(a, a_scale, w, w_scale, k, k // 2)
    check_residual(residual, a.shape[0], w.shape[0], out_dtype)
    out = ref.int_matmul_ref(ref.unpack_int4_ref(a), ref.unpack_int4_ref(w), a_scale, w_scale, bias, out_dtype,
                             a_bits=4, w_bits=4)
    return out if residual is None else out + residual
