"""Integer GEMMs with a dequantizing fp32 epilogue: ``flatquant::w4a4_matmul``, ``w4a8_matmul``, ``w8a8_matmul``.

Hopper has no fast int4 MMA, so 4-bit codes are stored packed and unpacked to int8 in registers; the products run
on int8 tensor cores (``tl.dot(int8, int8) -> int32``, wgmma s8 on sm_90) with exact int32 accumulation, and the
epilogue computes ``(acc · s_a[m]) · s_w[n] (+ bias)`` in fp32.

Layouts (no nibble shuffling in the inner loop, only two shifts per byte):

* W4A4: activations and weights both in the standard interleaved packing (element 2k low nibble, 2k+1 high).
  A byte tile unpacks into its even-k and odd-k halves; ``dot(A_even, W_even) + dot(A_odd, W_odd)`` is the full
  K sum, so no weight re-layout is needed.
* W4A8: int8 activations are read as two contiguous half-tiles, so the weights are stored in the ``halves`` layout
  (:func:`flatquant.ops.pack.int4_halves_layout`, K-tile ``W4A8_BLOCK_K``): byte j of a tile holds elements j and
  j + BLOCK_K/2.
* W8A8: plain int8 (N, K) weights.

Dispatch on CUDA (``w4a4_matmul`` / ``w4a8_matmul``; W4A8 unpacks only from ``UNPACK_MIN_M_W4A8``, since its
halves layout costs three passes to unpack): at ``M <= GEMV_MAX_M`` tokens (decode) the GEMM is bound by
the weight bytes and runs the split-K kernel of :mod:`flatquant.ops.gemv` (about 3x bf16 on the H100 at
LLaMA-3-8B MLP shapes). At ``M >= UNPACK_MIN_M`` tokens the GEMM is compute-bound
and the in-loop unpack costs more than it saves (measured on the H100, ``bench/results/probe_gemm_h100.log``: the
W8A8 loop reaches ~1100 TOPS, the W4A4 loop ~400 and W4A8 ~650 whichever operand sits in registers). So the packed
operands are first unpacked to int8 codes by a bandwidth-bound kernel into transient buffers (the weights stay
4-bit at rest; one layer's largest weight is 58 MB of scratch at 14336 x 4096) and the W8A8 kernel runs on them.
The integer codes, and so the results, are identical bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, dequant_epilogue, launch_options, nibble_hi, nibble_lo, on_cpu, pdl_wait, sm_count
from ._modes import MODE_W4A4 as MODE_W4A4
from ._modes import MODE_W4A8 as MODE_W4A8
from ._modes import MODE_W8A8 as MODE_W8A8
from ._modes import check_operands, check_residual, halves_cols
from ._register import register_op
from .gemv import qgemv_triton
from .pack import unpack_int4_triton

UNPACK_MIN_M = 128  # tokens from which 4-bit operands are unpacked to int8 before the GEMM (module docstring)
UNPACK_MIN_M_W4A8 = 4096  # the same for W4A8: its halves layout takes three passes to unpack (slower at M=256)
GEMV_MAX_M = 16  # tokens up to which 4-bit weights go through the split-K kernel of flatquant.ops.gemv


def _configs() -> list[triton.Config]:
    shapes = [
        # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (128, 256, 128, 8, 3), (128, 256, 256, 8, 3), (256, 128, 128, 8, 3), (256, 128, 256, 8, 3),
        (128, 128, 256, 8, 4), (128, 128, 128, 4, 4),
        (64, 128, 256, 4, 4), (64, 256, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 256, 4, 5),
        (16, 64, 256, 4, 4), (16, 128, 256, 4, 4), (16, 32, 512, 4, 4), (16, 64, 128, 4, 6), (32, 64, 512, 4, 3),
    ]
    swapped = [
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 256, 8, 4), (64, 256, 128, 8, 3),
        (64, 128, 256, 4, 4), (16, 128, 256, 4, 4), (32, 128, 256, 4, 4), (16, 64, 512, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP_AB": sw},
                          num_warps=w, num_stages=s)
            for sw, lst in ((False, shapes), (True, swapped)) for bm, bn, bk, w, s in lst]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    bucket = named_args["M_BUCKET"]
    mode = kwargs.get("MODE", named_args.get("MODE"))
    lo, hi = {16: (16, 32), 64: (16, 64), 256: (64, 128), 1024: (64, 256)}.get(bucket, (128, 256))
    out = [c for c in configs if lo <= c.kwargs["BLOCK_M"] <= hi]
    if mode == MODE_W4A8:
        out = [c for c in out if c.kwargs["BLOCK_K"] == ref.W4A8_BLOCK_K]
    if mode == MODE_W8A8:
        out = [c for c in out if not c.kwargs["SWAP_AB"]]
    return out or configs[:1]


def m_bucket(m: int) -> int:
    """Autotuning bucket of the token count (decode, small, medium, prefill)."""
    for b in (16, 64, 256, 1024):
        if m <= b:
            return b
    return 4096


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order (Triton tutorial 03): GROUP_M row tiles share each
    weight tile while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def _qmatmul_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, c_ptr,
    M, N, K, stride_am, stride_wn, stride_cm, M_BUCKET,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr = False, INTERPRET_BF16: tl.constexpr = False,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the edge are wrapped (loads stay in bounds; their results are never stored).
    rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    HALF: tl.constexpr = BLOCK_K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    if MODE == 1 and SWAP_AB:
        # W4A4, operands swapped (accᵀ = W Xᵀ): the unpacked weight tile is the register operand of the MMA.
        kh = tl.arange(0, HALF)
        w_ptrs = w_ptr + rn[:, None] * stride_wn + kh[None, :]
        a_ptrs = a_ptr + rm[None, :] * stride_am + kh[:, None]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        kb = K // 2
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                w = tl.load(w_ptrs)
                a = tl.load(a_ptrs)
            else:
                w = tl.load(w_ptrs, mask=kh[None, :] < kb - k * HALF, other=0)
                a = tl.load(a_ptrs, mask=kh[:, None] < kb - k * HALF, other=0)
            acc_t = tl.dot(nibble_lo(w), nibble_lo(a), acc_t, out_dtype=tl.int32)
            acc_t = tl.dot(nibble_hi(w), nibble_hi(a), acc_t, out_dtype=tl.int32)
            a_ptrs += HALF
            w_ptrs += HALF
        acc = tl.trans(acc_t)
    elif MODE == 2 and SWAP_AB:
        # W4A8, operands swapped: unpacked weight half tiles in registers, int8 activations straight from memory.
        kh = tl.arange(0, HALF)
        w_ptrs = w_ptr + rn[:, None] * stride_wn + kh[None, :]
        a_ptrs = a_ptr + rm[None, :] * stride_am + kh[:, None]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a0 = tl.load(a_ptrs)
                a1 = tl.load(a_ptrs + HALF)
            else:
                rem = K - k * BLOCK_K
                a0 = tl.load(a_ptrs, mask=kh[:, None] < rem, other=0)
                a1 = tl.load(a_ptrs + HALF, mask=kh[:, None] + HALF < rem, other=0)
            w = tl.load(w_ptrs)
            acc_t = tl.dot(nibble_lo(w), a0, acc_t, out_dtype=tl.int32)
            acc_t = tl.dot(nibble_hi(w), a1, acc_t, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += HALF
        acc = tl.trans(acc_t)
    elif MODE == 1:
        # W4A4: both operands interleaved-packed; one byte tile -> even-k and odd-k int8 half tiles.
        kh = tl.arange(0, HALF)
        a_ptrs = a_ptr + rm[:, None] * stride_am + kh[None, :]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + kh[:, None]
        kb = K // 2
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=kh[None, :] < kb - k * HALF, other=0)
                w = tl.load(w_ptrs, mask=kh[:, None] < kb - k * HALF, other=0)
            acc = tl.dot(nibble_lo(a), nibble_lo(w), acc, out_dtype=tl.int32)
            acc = tl.dot(nibble_hi(a), nibble_hi(w), acc, out_dtype=tl.int32)
            a_ptrs += HALF
            w_ptrs += HALF
    elif MODE == 2:
        # W4A8: int8 activation half tiles [k0, k0+HALF) and [k0+HALF, k0+BLOCK_K) meet the low / high nibbles
        # of the halves-layout weight tile (weights are zero-padded to whole tiles).
        kh = tl.arange(0, HALF)
        a_ptrs = a_ptr + rm[:, None] * stride_am + kh[None, :]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + kh[:, None]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a0 = tl.load(a_ptrs)
                a1 = tl.load(a_ptrs + HALF)
            else:
                rem = K - k * BLOCK_K
                a0 = tl.load(a_ptrs, mask=kh[None, :] < rem, other=0)
                a1 = tl.load(a_ptrs + HALF, mask=kh[None, :] + HALF < rem, other=0)
            w = tl.load(w_ptrs)
            acc = tl.dot(a0, nibble_lo(w), acc, out_dtype=tl.int32)
            acc = tl.dot(a1, nibble_hi(w), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += HALF
    else:
        # W8A8: plain int8 tiles.
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None] * stride_am + kk[None, :]
        w_ptrs = w_ptr + rn[None, :] * stride_wn + kk[:, None]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                a = tl.load(a_ptrs, mask=kk[None, :] < K - k * BLOCK_K, other=0)
                w = tl.load(w_ptrs, mask=kk[:, None] < K - k * BLOCK_K, other=0)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

    # fp32 epilogue: (acc · s_a[m]) · s_w[n] (+ bias), cast once to the output dtype.
    dequant_epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS, INTERPRET_BF16,
                     c_ptr, False)


qmatmul_tuned = triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K", "MODE"], prune_configs_by={"early_config_prune": _prune}
)(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_qmatmul_kernel))

# Public handle on the untuned kernel for bench/probe_gemm.py (same object; the kernel keeps its name).
qmatmul_kernel = _qmatmul_kernel

_CPU_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 4, "SWAP_AB": False}


def qmatmul_triton(
    a: Tensor,  # (M, K/2) uint8 (MODE_W4A4) or (M, K) int8
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, K/2) uint8 interleaved (W4A4), (N, Kp/2) uint8 halves (W4A8), or (N, K) int8 (W8A8)
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    k: int,
    mode: int,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> Tensor:  # (M, N)
    """Triton launcher shared by the three GEMM ops (interpreter on CPU tensors, autotuned on CUDA).

    ``config`` (``BLOCK_M/N/K``, ``GROUP_M``, ``SWAP_AB``) bypasses autotuning, e.g. to test one code path.
    """
    m, n = a.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    a = a.contiguous().view(torch.int8)
    w = w.contiguous().view(torch.int8)
    args = (a, w, a_scale.float().contiguous(), w_scale.float().contiguous(),
            bias.contiguous() if bias is not None else a_scale, out, m, n, k, a.stride(0), w.stride(0),
            out.stride(0), m_bucket(m))
    if on_cpu(a) or config is not None:
        cfg = dict(_CPU_CONFIG) | (config or {})
        if mode == MODE_W4A8:
            cfg["BLOCK_K"] = ref.W4A8_BLOCK_K
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        kernel = cpu_kernel(_qmatmul_kernel) if on_cpu(a) else _qmatmul_kernel
        kernel[grid](*args, MODE=mode, HAS_BIAS=bias is not None,
                                          EVEN_K=k % cfg["BLOCK_K"] == 0,
                     INTERPRET_BF16=on_cpu(a) and out_dtype == torch.bfloat16, **cfg)
    else:
        def tuned_grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        qmatmul_tuned[tuned_grid](*args, MODE=mode, HAS_BIAS=bias is not None)
    return out


@triton.jit
def _w8a8_tma_kernel(
    a_desc, w_desc, sa_ptr, sw_ptr, bias_ptr, c_ptr, res_ptr, M, N, K, stride_cm, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr = False, FLATTEN: tl.constexpr = False,
    INTERPRET_BF16: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # W8A8 with both int8 tiles fed by TMA (host descriptors; edges are zero-filled by the copy engine): the
    # prefill path. Same grouped order and fp32 epilogue as _qmatmul_kernel. Program p computes output tiles p,
    # p + P, ... (P programs): one tile each when the grid covers them all; PERSISTENT (the launcher's grid is one
    # program per SM) otherwise, where FLATTEN lets the software pipeline run on into the next tile's loads while
    # this tile's epilogue runs. The K loop is pipelined over the launch's num_stages. HAS_RES: the epilogue adds
    # the residual at res_ptr (c's dtype and strides; a prefill layer's residual stream).
    pdl_wait(PDL)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        dequant_epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sw_ptr, bias_ptr, c_ptr, stride_cm, HAS_BIAS,
                         INTERPRET_BF16, res_ptr, HAS_RES)


# Tiles measured on the H100 (bench/results/probe_tma_h100.log): 256x128x128 with 4 stages was best or within 3%
# on every prefill shape; 128x256 wins some. On the H200 (probe_tma_h200.json, the engine's fused projections at
# 2048 and 32768 tokens) the persistent schedules win 1-5% on most shapes (32768 x 4096 x 4096: 922 vs 970 us) and
# one tile per program stays best on others (2048 x 14336 x 4096: 182.6 us), so the autotuner picks among both.
# Entries: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, persistent, flatten).
TmaTile = tuple[int, int, int, int, int, bool, bool]
_TMA_TILES: list[TmaTile] = [(256, 128, 128, 8, 4, False, False), (128, 256, 128, 8, 4, False, False),
                             (256, 128, 128, 8, 3, False, False), (256, 128, 128, 8, 4, True, True),
                             (128, 256, 128, 8, 3, True, True), (128, 256, 128, 8, 3, True, False)]


def _set_tma_blocks(nargs: dict) -> None:
    """Autotuner pre-hook: the descriptors' block shapes follow the tile being launched."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_config(tile: TmaTile) -> triton.Config:
    bm, bn, bk, warps, stages, persistent, flatten = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": persistent,
                          "FLATTEN": flatten}, num_warps=warps, num_stages=stages, pre_hook=_set_tma_blocks)


_w8a8_tma_tuned = triton.autotune(configs=[_tma_config(t) for t in _TMA_TILES],
                                  key=["M_BUCKET", "N", "K", "HAS_RES"])(_w8a8_tma_kernel)


def _tma_grid(m: int, n: int, bm: int, bn: int, persistent: bool, device: torch.device) -> tuple[int]:
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return (min(tiles, sm_count(device)) if persistent else tiles,)


def tma_usable(a: Tensor, w: Tensor) -> bool:
    """Whether the TMA kernel can take both int8 operands: a Hopper-class GPU (its tiles need ~200 KB of shared
    memory), non-empty tensors, 16-byte aligned base and row stride, unit inner stride."""
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return all(t.numel() > 0 and t.stride(-1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (a, w))


def w8a8_tma_triton(
    a: Tensor,  # (M, K) int8, tma_usable
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, K) int8, tma_usable
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
    config: tuple[int, ...] | None = None,
    residual: Tensor | None = None,  # (M, N) out_dtype
) -> Tensor:  # (M, N)
    """The TMA-fed W8A8 GEMM (autotuned on CUDA; ``config`` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[,
    persistent, flatten]) fixes the tile and the schedule, and CPU tensors run it through the interpreter).
    ``residual`` is added in the epilogue, rounded as ``out + residual`` in ``out_dtype`` rounds it."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    sa, sw = a_scale.float().contiguous(), w_scale.float().contiguous()
    b = bias.contiguous() if bias is not None else sa
    check_residual(residual, m, n, out_dtype)
    res = residual.contiguous() if residual is not None else out
    cpu = on_cpu(a)
    if cpu or config is not None:
        tile = tuple(config or (32, 32, 64, 4, 2))
        if len(tile) not in (5, 7):
            raise ValueError(f"config must be (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent, flatten]), "
                             f"got {tile}")
        bm, bn, bk, warps, stages, persistent, flatten = tile + (False, False) if len(tile) == 5 else tile
        descs = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]))
        kernel = cpu_kernel(_w8a8_tma_kernel) if cpu else _w8a8_tma_kernel
        kernel[_tma_grid(m, n, bm, bn, bool(persistent), a.device)](
            *descs, sa, sw, b, out, res, m, n, k, out.stride(0), m_bucket(m), HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            PERSISTENT=bool(persistent), FLATTEN=bool(flatten), INTERPRET_BF16=cpu and out_dtype == torch.bfloat16,
            **({} if cpu else {"num_warps": warps, "num_stages": stages}))
        return out
    bm, bn, bk = _TMA_TILES[0][:3]  # block shapes are reset per tile by the autotuner's pre-hook
    a_desc, w_desc = TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk])

    def tuned_grid(meta: dict) -> tuple[int]:
        return _tma_grid(m, n, meta["BLOCK_M"], meta["BLOCK_N"], meta["PERSISTENT"], a.device)

    _w8a8_tma_tuned[tuned_grid](a_desc, w_desc, sa, sw, b, out, res, m, n, k, out.stride(0), m_bucket(m),
                                HAS_BIAS=bias is not None, HAS_RES=residual is not None,
                                **launch_options(a.device, m))
    return out


def int8_gemm_triton(
    a: Tensor,  # (M, K) int8
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, K) int8
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
    residual: Tensor | None = None,  # (M, N) out_dtype
) -> Tensor:  # (M, N)
    """W8A8 on CUDA: the TMA kernel where TMA's alignment rules hold (``residual`` added in its epilogue), else
    the pointer kernel (then ``+ residual``: the same bits)."""
    a, w = a.contiguous(), w.contiguous()
    if not on_cpu(a) and tma_usable(a, w):
        return w8a8_tma_triton(a, a_scale, w, w_scale, bias, out_dtype, residual=residual)
    out = qmatmul_triton(a, a_scale, w, w_scale, bias, a.shape[1], MODE_W8A8, out_dtype)
    return out if residual is None else out + residual


def _w4_triton(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
               out_dtype: torch.dtype, mode: int, unpack_min_m: int) -> Tensor:
    """4-bit-weight GEMM dispatch by token count (after the operand checks): split-K kernel up to ``GEMV_MAX_M``
    tokens, the fused-unpack kernel below ``unpack_min_m``, else unpack both operands to int8 codes + the W8A8
    kernel."""
    m = a.shape[0]
    k = a.shape[1] * 2 if mode == MODE_W4A4 else a.shape[1]
    check_operands(a, a_scale, w, w_scale, k, k // 2 if mode == MODE_W4A4 else halves_cols(k))
    if m == 0 or w.shape[0] == 0 or k == 0:
        return qmatmul_triton(a, a_scale, w, w_scale, bias, k, mode, out_dtype)
    if m <= GEMV_MAX_M:
        return qgemv_triton(a, a_scale, w, w_scale, bias, k, mode, out_dtype)
    if m >= unpack_min_m:
        if mode == MODE_W4A4:
            a8, w8 = unpack_int4_triton(a), unpack_int4_triton(w)
        else:
            a8, w8 = a, halves_to_codes_triton(w, k)
        return int8_gemm_triton(a8, a_scale, w8, w_scale, bias, out_dtype)
    return qmatmul_triton(a, a_scale, w, w_scale, bias, k, mode, out_dtype)


def halves_to_codes_triton(w: Tensor, k: int) -> Tensor:  # (N, Kp/2) uint8 halves -> (N, K) int8
    """Unpack the W4A8 ``halves`` layout to int8 codes (Triton unpack, then the tile-half interleave undone)."""
    n, hb = w.shape[0], ref.W4A8_BLOCK_K // 2
    codes = unpack_int4_triton(w.reshape(n, -1, hb)).view(n, -1, hb, 2).transpose(-1, -2).reshape(n, -1)
    return codes[:, :k]


def w4a4_triton(
    a: Tensor,  # (M, K/2) uint8 interleaved
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, K/2) uint8 interleaved
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
    unpack_min_m: int = UNPACK_MIN_M,
) -> Tensor:  # (M, N)
    """W4A4 on Triton, dispatched by token count (see the module docstring)."""
    return _w4_triton(a, a_scale, w, w_scale, bias, out_dtype, MODE_W4A4, unpack_min_m)


def w4a8_triton(
    a: Tensor,  # (M, K) int8
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, Kp/2) uint8 halves
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
    unpack_min_m: int = UNPACK_MIN_M_W4A8,
) -> Tensor:  # (M, N)
    """W4A8 on Triton, dispatched by token count (see the module docstring)."""
    return _w4_triton(a, a_scale, w, w_scale, bias, out_dtype, MODE_W4A8, unpack_min_m)


def w8a8_triton(
    a: Tensor,  # (M, K) int8
    a_scale: Tensor,  # (M,) fp32
    w: Tensor,  # (N, K) int8
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
    residual: Tensor | None = None,  # (M, N) out_dtype
) -> Tensor:  # (M, N)
    """W8A8 on Triton: :func:`int8_gemm_triton` from ``UNPACK_MIN_M`` tokens, the pointer kernel below."""
    k = a.shape[1]
    check_operands(a, a_scale, w, w_scale, k, k)
    check_residual(residual, a.shape[0], w.shape[0], out_dtype)
    if a.shape[0] >= UNPACK_MIN_M:
        return int8_gemm_triton(a, a_scale, w, w_scale, bias, out_dtype, residual)
    out = qmatmul_triton(a, a_scale, w, w_scale, bias, k, MODE_W8A8, out_dtype)
    return out if residual is None else out + residual


def _matmul_fake(a: Tensor, w: Tensor, out_dtype: torch.dtype, **_: object) -> Tensor:
    return a.new_empty(a.shape[0], w.shape[0], dtype=out_dtype)


@register_op("flatquant::w4a4_matmul", cuda=w4a4_triton, fake=_matmul_fake)
def w4a4_matmul(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """``(unpack(a) @ unpack(w)ᵀ) · s_a[:, None] · s_w[None, :] (+ bias)``.

    Args:
        a: ``(M, K/2)`` uint8 packed int4 activation codes; a_scale: ``(M,)`` fp32.
        w: ``(N, K/2)`` uint8 packed int4 weight codes (same interleaved packing); w_scale: ``(N,)`` fp32.
        bias: optional ``(N,)``; out_dtype: bf16/fp16/fp32.

    Returns:
        ``(M, N)`` in ``out_dtype``.
    """
    k = a.shape[1] * 2
    check_operands(a, a_scale, w, w_scale, k, k // 2)
    return ref.int_matmul_ref(ref.unpack_int4_ref(a), ref.unpack_int4_ref(w), a_scale, w_scale, bias, out_dtype,
                              a_bits=4, w_bits=4)


@register_op("flatquant::w4a8_matmul", cuda=w4a8_triton, fake=_matmul_fake)
def w4a8_matmul(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """int8 activations ``(M, K)`` × int4 weights in the ``halves`` layout ``(N, Kp/2)`` uint8, fp32 epilogue."""
    k = a.shape[1]
    check_operands(a, a_scale, w, w_scale, k, halves_cols(k))
    return ref.int_matmul_ref(a, ref.halves_to_codes_ref(w)[:, :k], a_scale, w_scale, bias, out_dtype, w_bits=4)


@register_op("flatquant::w8a8_matmul", cuda=w8a8_triton, fake=_matmul_fake)
def w8a8_matmul(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype, residual: Tensor | None = None) -> Tensor:
    """int8 activations ``(M, K)`` × int8 weights ``(N, K)``, exact int32 accumulation, fp32 epilogue;
    ``residual`` (optional ``(M, N)`` in ``out_dtype``, a prefill layer's residual stream) is added to the result,
    in the GEMM's epilogue on CUDA from ``UNPACK_MIN_M`` tokens (the bits of ``out + residual``)."""
    k = a.shape[1]
    check_operands(a, a_scale, w, w_scale, k, k)
    check_residual(residual, a.shape[0], w.shape[0], out_dtype)
    out = ref.int_matmul_ref(a, w, a_scale, w_scale, bias, out_dtype)
    return out if residual is None else out + residual
