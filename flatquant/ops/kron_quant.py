"""Fused online transform + LAC + per-token symmetric quantization (+ int4 packing): ``flatquant::kron_quant``.

One op covers the three online transforms of a decoder layer that feed a quantized linear:

* Kronecker ``leftᵀ X right`` (ln / up_gate / down transforms; any factorable n, e.g. 576 = 24×24, 11008 = 86×128);
* head mixing for o_proj, ``Oᵀ Y`` with ``Y`` the ``(heads, head_dim)`` view: ``left = O``, ``right = None``;
* a per-head right transform (``right`` only, ``n1 = heads``).

Tile sides are padded to powers of two (>= 16) and masked, so no dimension needs to be a power of two.

This module holds the op, its checks, the choice of layout, the launcher and the whole / chunked layout's kernel;
the other layouts' kernels are in :mod:`flatquant.ops._kron_prefill` (many tokens) and
:mod:`flatquant.ops._kron_split` (the decode split), the tile helpers they share in
:mod:`flatquant.ops._kron_tiles`.
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
from ._kron_prefill import (
    _kron_quant_pipe_kernel,
    _kron_quant_rowsplit_kernel,
    _kron_quant_tb_kernel,
    _kron_right_kernel,
)
from ._kron_split import _kron_cols_kernel, _kron_finish_kernel
from ._kron_tiles import _load_clips, _load_lt, _load_norm_weight, _load_token, _quant_cols, _rms_norm_tile, _y_cols
from ._launch import cpu_kernel, launch_options, next_pow2, on_cpu, pdl_wait, sm_count
from ._register import register_op


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
            "multi_token_split")
PIPELINED = ("pipelined", "pipelined_fastq", "multi_token", "multi_token_split")  # need both factors (else whole)
SPLIT_MAX_T = 16  # tokens up to which large transforms are split across programs (decode)
SPLIT_MIN_ELEMS = 64 * 128  # padded n1 x n2 from which the split pays for its second launch
PIPELINE_MIN_T = 128  # tokens from which the pipelined, division-free layouts are the default (prefill)
MULTI_TOKEN_TILE = 128  # padded n1 = n2 at which multi_token is the prefill default (the measured tile; larger tiles
# would need more shared memory per cp.async stage than an SM has with the SwiGLU input: pipelined_fastq there)
# multi_token's default launch (H200, bench/results/probe_kron_h200_s7.json): one token per block, loads left to a
# 3-stage cp.async pipeline (no register prefetch), 8 warps, one program per SM; larger blocks hit the 255-register
# cap and were slower (K=14336, 2048 tokens: 75.7 us with 2 tokens, 176.6 with 4, against 61.0).
MULTI_TOKEN_BLOCK, MULTI_TOKEN_STAGES, MULTI_TOKEN_PROGRAMS_PER_SM = 1, 3, 1
# multi_token_split's default launch without the SwiGLU input (H200, bench/results/probe_kron_h200_s9_sat.json):
# 4 warps, 2 stages, two programs per SM (two tokens in flight on an SM): K=11008, 2048 / 32768 tokens 48.0 / 618 us
# against 50.3 / 693 with multi_token's launch. With the SwiGLU input multi_token's launch (4 warps: 133 against
# 80 us at 2048 tokens).
SPLIT_WARPS, SPLIT_STAGES, SPLIT_PROGRAMS_PER_SM = 4, 2, 2


def row_split_blocks(n1: int, n1p: int) -> int:
    """Row blocks of the ``multi_token_split`` layout for ``n1`` rows padded to ``n1p``: 2 (``n1p/2 + n1p/4``) for
    ``n1 <= 3/4 n1p``, 3 (``+ n1p/8``) for ``n1 <= 7/8 n1p``, else 0 (no saving: ``multi_token`` runs instead);
    blocks are at least 16 rows (the smallest tl.dot side)."""
    if 4 * n1 <= 3 * n1p and n1p >= 64:
        return 2
    if 8 * n1 <= 7 * n1p and n1p >= 128:
        return 3
    return 0


def default_variant(t: int, n1: int, n2: int, norm: bool = False) -> str:
    """The kernel layout :func:`kron_quant_triton` uses by default for ``t`` tokens of ``n1 x n2`` (see there;
    ``norm``: the RMSNorm runs in the kernel).

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
    Where ``n1`` leaves a quarter of its padded tile unused (86 of 128: :func:`row_split_blocks` gives 2 blocks)
    and without the in-kernel norm (whose per-block mean may differ from whole's in its last bit),
    multi_token_split (bench/results/probe_kron_h200_s9_sat.json, side by side with multi_token at its default
    launch, both with the saturating pack; codes equal whole's): 2048 / 32768 tokens 48.0 / 618 us (its default
    launch) against 60.3 / 855 at 11008, 79.8 / 1139 against 94.7 / 1403 with the SwiGLU input. At three blocks
    (112 rows) it gained 1-2 % at most and lost at 2048 tokens without the SwiGLU input (59.9 / 834 against
    58.8 / 854 for the 14336 transform; 95.9 / 1398 against 96.9 / 1428 with the SwiGLU input): multi_token.
    """
    if t <= SPLIT_MAX_T and next_pow2(n1) * next_pow2(n2) >= SPLIT_MIN_ELEMS:
        return "split"
    if t >= PIPELINE_MIN_T and n1 > 1 and n2 > 1:
        if next_pow2(n1) != MULTI_TOKEN_TILE or next_pow2(n2) != MULTI_TOKEN_TILE:
            return "pipelined_fastq"
        return "multi_token_split" if row_split_blocks(n1, MULTI_TOKEN_TILE) == 2 and not norm else "multi_token"
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
      and an exact FMA correction, see ``_kron_tiles._quotient_fast``) and rounded by one conversion instruction.
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
      order: the codes are whole's bit for bit in the interpreter. Launch defaults: without ``up`` 4 warps, 2
      stages, two programs per SM (``SPLIT_WARPS``, ``SPLIT_STAGES``, ``SPLIT_PROGRAMS_PER_SM``), with it
      ``multi_token``'s (8 warps, 3 stages, one program per SM). The prefill default at two row blocks without the
      in-kernel norm (:func:`default_variant`, measured there): the offline sm_90 compile has 13 % fewer issued
      instructions per token than ``multi_token`` at 86 rows (15 % with the SwiGLU input) and 25 % fewer MMA flops,
      but more instructions at 112 rows (12.5 % fewer flops), where it is no faster.

    On CUDA the 4-bit packed codes of multi_token and multi_token_split are clamped by the pack itself
    (``cvt.pack.sat.s4``, after the rounding: the same codes; :func:`~flatquant.ops._kron_tiles._nibbles`), one
    instruction per pair instead of two clamps per element and the nibble arithmetic (offline sm_90 SASS: 1055 ->
    895 / 936 -> 816 instructions per warp and token).
    With ``up`` on CUDA every layout computes ``silu`` on the hardware approximations inline (``HAS_GLU=2``,
    :func:`~flatquant.ops._kron_tiles._load_act`; H200, bench/results/probe_kron_h200_s9_glu.json: no code of
    8.8e8 at LLaMA's down_proj sizes differs from the op fed torch's ``silu(gate) * up``, and those sites ran
    1.14-1.22x faster). A software-pipelined multi_token (the right product of the token after next in flight
    during the current token's epilogue) was measured slower on the H200 and removed (bench/README.md, session 9).

    ``up``: see :func:`kron_quant` (``x`` is then the SwiGLU gate). ``norm``, ``eps``: see :func:`kron_quant_multi`
    (in the kernel for the whole, chunked, split, pipelined and the two multi_token layouts with a right factor,
    else a separate RMSNorm first). ``programs`` caps the grid of the looping layouts (default 4 per SM on CUDA; for
    multi_token, programs of ``block_tokens`` tokens each, one per SM; multi_token_split: see there);
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
    variant = variant or default_variant(t, n1, n2, norm is not None)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "multi_token" and (block_tokens is not None or prefetch is not None):
        raise ValueError(f"block_tokens and prefetch apply to the multi_token layout only (this call runs "
                         f"{variant!r})")
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
    if variant == "multi_token_split":
        lean = up is None  # two programs of 4 warps per SM
        num_stages = num_stages or (SPLIT_STAGES if lean else MULTI_TOKEN_STAGES)
        num_warps = num_warps or (SPLIT_WARPS if lean else None)
        if programs is None and x.device.type == "cuda":
            programs = (SPLIT_PROGRAMS_PER_SM if lean else MULTI_TOKEN_PROGRAMS_PER_SM) * sm_count(x.device)
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
                          or variant in ("multi_token", "multi_token_split") else 4)
    extra = launch_options(x.device, t, num_warps=warps, num_stages=num_stages)
    lp, rp = left if left is not None else x, right if right is not None else x
    flags = {"HAS_LEFT": left is not None, "HAS_RIGHT": right is not None,
             "F32_DOT": cpu or x.dtype == torch.float32, "HAS_GLU": 0 if up is None else 1 if cpu else 2,
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
    if variant in PIPELINED:  # the looping many-token layouts: the same arguments, each its own constexprs
        own_args: dict[str, tuple[Any, dict[str, Any]]] = {
            "multi_token": (_kron_quant_tb_kernel, {"TB": block_tokens, "PREFETCH": prefetch}),
            "multi_token_split": (_kron_quant_rowsplit_kernel, {"NBLK": row_split_blocks(n1, n1p)}),
        }
        jit, own = own_args.get(variant, (_kron_quant_pipe_kernel, {"FAST_Q": variant == "pipelined_fastq"}))
        n_programs = min(grid, triton.cdiv(t, block_tokens)) if variant == "multi_token" else grid
        (cpu_kernel(jit) if cpu else jit)[(n_programs,)](
            x, up_p, lp, rp, clips, codes, scale, nw, t, n1, n2, x.stride(0), codes.stride(-2), stride_qg, stride_sg,
            float(eps), N1P=n1p, N2P=n2p, F32_DOT=flags["F32_DOT"], HAS_GLU=flags["HAS_GLU"],
            INTERPRET_BF16=flags["INTERPRET_BF16"], **quant, HAS_NORM=norm is not None, INTERPRET=cpu, **own,
            **extra,
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
