"""Decode attention over the packed 4-bit KV cache: ``flatquant::kv4_decode_attention``.

The cache holds, per (batch row, KV head, position), ``head_dim/2`` bytes of unsigned nibbles (element ``2k`` in the
low nibble, as written by ``flatquant::kv_quant``) and an fp32 scale and integer-valued zero point; a value is
``(code - zero) * scale``. One query token per batch row attends to cache positions ``[start[b], length[b])``
(``start`` skips left padding). GQA is handled in the kernel: one program serves the ``n_heads / n_kv_heads``
query heads of a KV head, so the cache is read once per KV head and never expanded.

The reference (:func:`flatquant.ops.reference.kv4_decode_attention_ref`, the CPU kernel) dequantizes the cache in
fp32 and runs an fp32 softmax; the Triton kernel dequantizes tiles in registers and uses an online (flash-decoding
style) softmax.

Kernel variants (launcher keywords of :func:`kv4_decode_attention_triton`, defaults by :func:`default_launch`;
``bench/probe_decode.py --sections attn`` times them on the GPU):

* ``swar``: nibbles to bf16/fp16 with inline-PTX bit tricks, four code bytes per call, instead of a shift, a mask and
  an integer-to-float conversion per element (CUDA; bit-identical; the interpreter always runs the plain unpack).
* ``swap``: the swapped MMA layout (cache tiles on the M side, the GQA group's query heads on the N side): a group of
  at most 8 heads pads to the MMA's n = 8 instead of its m = 16. The same sums in another accumulation order.
* ``block_t``, ``num_warps``, ``num_stages``, ``splits``: position tile, Triton launch options and flash-decoding
  chunks per (row, KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, launch_options, next_pow2, on_cpu, pdl_wait, round_to_bf16_f32, sm_count
from ._register import register_op

# Nibble -> 16-bit float with bit tricks (inline PTX, four code bytes per call). A code n in 0..15 ORed into the low
# mantissa bits of 128.0 (bf16 0x4300) or 1024.0 (fp16 0x6400) reads as 128 + n or 1024 + n; one packed fma per two
# values takes the magic number off again (exact). prmt places bytes 0/1 (2/3) of the masked word into the low
# bytes of the two 16-bit lanes of the first (second) output register: output element i is the nibble of input
# byte i, as Triton's pack=4 expects. The fp16 high nibbles are used in place (1024 + 16 n, times 1/16 minus 64).
_LO_BF16 = tl.constexpr(
    "{.reg .b32 t, one, off; mov.b32 one, 0x3F803F80; mov.b32 off, 0xC300C300; and.b32 t, $2, 0x0F0F0F0F; "
    "prmt.b32 $0, t, 0x43434343, 0x5140; prmt.b32 $1, t, 0x43434343, 0x7362; "
    "fma.rn.bf16x2 $0, $0, one, off; fma.rn.bf16x2 $1, $1, one, off;}")
_HI_BF16 = tl.constexpr(
    "{.reg .b32 t, one, off; mov.b32 one, 0x3F803F80; mov.b32 off, 0xC300C300; shr.b32 t, $2, 4; "
    "and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x43434343, 0x5140; prmt.b32 $1, t, 0x43434343, 0x7362; "
    "fma.rn.bf16x2 $0, $0, one, off; fma.rn.bf16x2 $1, $1, one, off;}")
_LO_F16 = tl.constexpr(
    "{.reg .b32 t, one, off; mov.b32 one, 0x3C003C00; mov.b32 off, 0xE400E400; and.b32 t, $2, 0x0F0F0F0F; "
    "prmt.b32 $0, t, 0x64646464, 0x5140; prmt.b32 $1, t, 0x64646464, 0x7362; "
    "fma.rn.f16x2 $0, $0, one, off; fma.rn.f16x2 $1, $1, one, off;}")
_HI_F16 = tl.constexpr(
    "{.reg .b32 t, sc, off; mov.b32 sc, 0x2C002C00; mov.b32 off, 0xD400D400; and.b32 t, $2, 0xF0F0F0F0; "
    "prmt.b32 $0, t, 0x64646464, 0x5140; prmt.b32 $1, t, 0x64646464, 0x7362; "
    "fma.rn.f16x2 $0, $0, sc, off; fma.rn.f16x2 $1, $1, sc, off;}")


@triton.jit
def _nibbles(codes, HIGH: tl.constexpr, SWAR: tl.constexpr, dt: tl.constexpr):
    """The low (``HIGH`` false: even elements) or high (odd elements) nibbles of a uint8 code tile as ``dt`` values
    0..15. ``SWAR`` (CUDA, bf16/fp16 only): the inline-PTX bit trick above, bit-identical to the plain
    shift / mask / integer-to-float conversion (exact either way)."""
    if SWAR:
        if dt == tl.bfloat16:
            if HIGH:
                out = tl.inline_asm_elementwise(_HI_BF16, "=r,=r,r", [codes], dtype=tl.bfloat16, is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise(_LO_BF16, "=r,=r,r", [codes], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            if HIGH:
                out = tl.inline_asm_elementwise(_HI_F16, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
            else:
                out = tl.inline_asm_elementwise(_LO_F16, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
    else:
        c = codes.to(tl.int32)
        if HIGH:
            c = c >> 4
        out = (c & 0xF).to(dt)
    return out


@triton.jit
def _transformed_q(q_ptr, qt_ptr, b, heads, r_ok, eh, d, stride_qb, stride_qh, DP: tl.constexpr, DH: tl.constexpr,
                   SWAP_AB: tl.constexpr, F32_DOT: tl.constexpr, Q_ROUND_BF16: tl.constexpr):
    """The even and odd head elements of ``q · M`` (``M`` the ``(d, d)`` matrix at ``qt_ptr``) for the query heads
    ``heads``, each in q's dtype: ``(REP_P, DH)`` tiles, or ``(DH, REP_P)`` with ``SWAP_AB``."""
    e = tl.arange(0, DP)
    e_ok = e < d
    m_mask = e_ok[:, None] & (eh < d // 2)[None, :]
    m_even = tl.load(qt_ptr + e[:, None] * d + 2 * eh[None, :], mask=m_mask, other=0.0)  # (DP, DH)
    m_odd = tl.load(qt_ptr + e[:, None] * d + 2 * eh[None, :] + 1, mask=m_mask, other=0.0)
    qd = q_ptr.dtype.element_ty
    prec: tl.constexpr = "ieee" if F32_DOT else None
    if F32_DOT:  # the dots' operand type
        ct = tl.float32
    else:
        ct = qd
    if SWAP_AB:  # (DH, DP) x (DP, REP_P): the group's heads stay on the MMA's N side
        qt = tl.load(q_ptr + b * stride_qb + heads[None, :] * stride_qh + e[:, None],
                     mask=r_ok[None, :] & e_ok[:, None], other=0.0).to(ct)
        ye = tl.dot(tl.trans(m_even).to(ct), qt, input_precision=prec)
        yo = tl.dot(tl.trans(m_odd).to(ct), qt, input_precision=prec)
    else:
        qq = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + e[None, :],
                     mask=r_ok[:, None] & e_ok[None, :], other=0.0).to(ct)
        ye = tl.dot(qq, m_even.to(ct), input_precision=prec)
        yo = tl.dot(qq, m_odd.to(ct), input_precision=prec)
    if Q_ROUND_BF16:
        ye = round_to_bf16_f32(ye)
        yo = round_to_bf16_f32(yo)
    return ye.to(qd), yo.to(qd)


@triton.jit
def _kv4_decode_attention_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, start_ptr, len_ptr, o_ptr,
    ml_ptr, qt_ptr, rep, d, sm_scale, chunk,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh, stride_ob, stride_oh,
    REP_P: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, F32_DOT: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_D: tl.constexpr, SWAR: tl.constexpr, SWAP_AB: tl.constexpr, HAS_QT: tl.constexpr = False,
    Q_ROUND_BF16: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # One program = one (batch row, KV head, position chunk): its REP query heads against that head's packed K/V
    # in positions [split * chunk, (split + 1) * chunk), BLOCK_T cache positions at a time, with the running
    # max / sum of the online softmax in fp32. SPLIT: the unnormalised partial (acc, max, sum) goes to a workspace
    # (o_ptr: (B, Hq, splits, DP) fp32, ml_ptr: (B, Hq, splits, 2) fp32) for _kv4_combine_kernel; else the
    # normalised output is stored (one chunk covers the whole cache).
    # The dots run on the raw codes (0..15, exact in bf16): with k = (c_k - z_k)·s_k and v = (c_v - z_v)·s_v,
    #   q·k = s_k (q·c_k - z_k Σq)            and   Σ_t p_t v_t = Σ_t (p_t s_v,t) c_v,t - Σ_t (p_t s_v,t) z_v,t,
    # so scale and zero act on (REP, BLOCK_T) score/probability tiles, never on (BLOCK_T, d) value tiles. Even and
    # odd elements (low and high nibbles) are separate half-width dots, so the bytes are never interleaved.
    # SWAP_AB: the same sums with every tile transposed: the cache tiles are the MMA's M side (BLOCK_T positions,
    # DH head elements) and the REP query heads its N side, so that a GQA group of <= 8 heads pads to the MMA's
    # n = 8 instead of its m = 16 (half the tensor-core instructions and half the padded score elements).
    # The softmax sum and the zero correction are kept per position (l_t, corr_t: score-tile shaped, rescaled like
    # the accumulators) and reduced once after the loop: per step only the running max is reduced across warps.
    # HAS_QT: the queries are first multiplied by the (d, d) matrix at qt_ptr (the K transform's inverse-transpose)
    # and rounded to q's dtype, as the unfused engine's separate product rounds them (Q_ROUND_BF16: under the
    # interpreter, whose fp32 -> bf16 cast truncates).
    pdl_wait(PDL)
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    DH: tl.constexpr = DP // 2
    r = tl.arange(0, REP_P)
    eh = tl.arange(0, DH)
    r_ok = r < rep
    eh_ok = eh < d // 2
    heads = g * rep + r
    prec: tl.constexpr = "ieee" if F32_DOT else None
    if F32_DOT:
        dt = tl.float32
    else:
        dt = q_ptr.dtype.element_ty
    q_axis: tl.constexpr = 0 if SWAP_AB else 1  # the head-dim axis of the query tiles
    if SWAP_AB:  # (DH, REP_P) query tiles
        q_off = b * stride_qb + heads[None, :] * stride_qh + 2 * eh[:, None]
        q_mask = r_ok[None, :] & eh_ok[:, None]
    else:  # (REP_P, DH)
        q_off = b * stride_qb + heads[:, None] * stride_qh + 2 * eh[None, :]
        q_mask = r_ok[:, None] & eh_ok[None, :]
    if HAS_QT:
        qe, qo = _transformed_q(q_ptr, qt_ptr, b, heads, r_ok, eh, d, stride_qb, stride_qh, DP, DH, SWAP_AB,
                                F32_DOT, Q_ROUND_BF16)
    else:
        qe = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
        qo = tl.load(q_ptr + q_off + 1, mask=q_mask, other=0.0)
    qe = (qe.to(tl.float32) * sm_scale).to(dt)
    qo = (qo.to(tl.float32) * sm_scale).to(dt)
    q_sum = tl.sum(qe.to(tl.float32), axis=q_axis) + tl.sum(qo.to(tl.float32), axis=q_axis)  # (REP_P,)
    t_lo = tl.maximum(tl.load(start_ptr + b), sp * chunk)
    t_hi = tl.minimum(tl.load(len_ptr + b), sp * chunk + chunk)
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    if SWAP_AB:
        acc_e = tl.zeros((DH, REP_P), tl.float32)
        acc_o = tl.zeros((DH, REP_P), tl.float32)
        l_t = tl.zeros((BLOCK_T, REP_P), tl.float32)
        corr_t = tl.zeros((BLOCK_T, REP_P), tl.float32)
    else:
        acc_e = tl.zeros((REP_P, DH), tl.float32)
        acc_o = tl.zeros((REP_P, DH), tl.float32)
        l_t = tl.zeros((REP_P, BLOCK_T), tl.float32)
        corr_t = tl.zeros((REP_P, BLOCK_T), tl.float32)
    c_base = b * stride_cb + g * stride_ch
    s_base = b * stride_sb + g * stride_sh
    for t0 in range((t_lo // BLOCK_T) * BLOCK_T, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = (t >= t_lo) & (t < t_hi)
        c_off = c_base + t[:, None].to(tl.int64) * stride_ct + eh[None, :]
        if EVEN_D:
            c_mask = t_ok[:, None]  # no head-dim mask: the code rows load as 16-byte vectors
        else:
            c_mask = t_ok[:, None] & eh_ok[None, :]
        kb = tl.load(kc_ptr + c_off, mask=c_mask, other=0)  # (BLOCK_T, DH) uint8
        if SWAP_AB:
            # V codes as a (DH, BLOCK_T) tile of pointers: Triton then stages them through shared memory (cp.async)
            # into the MMA's A operand. tl.trans of a (BLOCK_T, DH) tile instead left them in registers across
            # loop steps, unpacked byte by byte (sm_90 SASS, Triton 3.6: 612 vs 572 instructions per step).
            v_off = c_base + t[None, :].to(tl.int64) * stride_ct + eh[:, None]
            if EVEN_D:
                vb = tl.load(vc_ptr + v_off, mask=t_ok[None, :], other=0)
            else:
                vb = tl.load(vc_ptr + v_off, mask=t_ok[None, :] & eh_ok[:, None], other=0)
        else:
            vb = tl.load(vc_ptr + c_off, mask=c_mask, other=0)
        ks = tl.load(ks_ptr + s_base + t, mask=t_ok, other=0.0)
        kz = tl.load(kz_ptr + s_base + t, mask=t_ok, other=0.0)
        vs = tl.load(vs_ptr + s_base + t, mask=t_ok, other=0.0)
        vz = tl.load(vz_ptr + s_base + t, mask=t_ok, other=0.0)
        k_lo = _nibbles(kb, False, SWAR, dt)
        k_hi = _nibbles(kb, True, SWAR, dt)
        if SWAP_AB:
            qc = tl.dot(k_lo, qe, input_precision=prec)
            qc = tl.dot(k_hi, qo, qc, input_precision=prec)  # (BLOCK_T, REP_P) fp32
            s = (qc - kz[:, None] * q_sum[None, :]) * ks[:, None]
            s = tl.where(t_ok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[None, :])
            l_t = l_t * alpha[None, :] + p
            pv = (p * vs[:, None]).to(dt)  # rounded once; the zero correction uses the same rounded weights
            corr_t = corr_t * alpha[None, :] + pv.to(tl.float32) * vz[:, None]
            v_lo = _nibbles(vb, False, SWAR, dt)  # (DH, BLOCK_T)
            v_hi = _nibbles(vb, True, SWAR, dt)
            acc_e = tl.dot(v_lo, pv, acc_e * alpha[None, :], input_precision=prec)
            acc_o = tl.dot(v_hi, pv, acc_o * alpha[None, :], input_precision=prec)
        else:
            qc = tl.dot(qe, tl.trans(k_lo), input_precision=prec) + tl.dot(qo, tl.trans(k_hi), input_precision=prec)
            s = (qc - q_sum[:, None] * kz[None, :]) * ks[None, :]  # (REP_P, BLOCK_T)
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_t = l_t * alpha[:, None] + p
            pv = (p * vs[None, :]).to(dt)  # rounded once; the zero correction uses the same rounded weights
            corr_t = corr_t * alpha[:, None] + pv.to(tl.float32) * vz[None, :]
            v_lo = _nibbles(vb, False, SWAR, dt)
            v_hi = _nibbles(vb, True, SWAR, dt)
            acc_e = acc_e * alpha[:, None] + tl.dot(pv, v_lo, input_precision=prec)
            acc_o = acc_o * alpha[:, None] + tl.dot(pv, v_hi, input_precision=prec)
        m_i = m_new
    if SWAP_AB:
        acc_e = tl.trans(acc_e)
        acc_o = tl.trans(acc_o)
        l_i = tl.sum(l_t, axis=0)
        corr = tl.sum(corr_t, axis=0)
    else:
        l_i = tl.sum(l_t, axis=1)
        corr = tl.sum(corr_t, axis=1)
    acc_e = acc_e - corr[:, None]  # (REP_P, DH)
    acc_o = acc_o - corr[:, None]
    if SPLIT:
        n_sp = tl.num_programs(2)
        row = (b * rep * tl.num_programs(1) + heads) * n_sp + sp  # (REP_P,) index of (b, head, split)
        tl.store(o_ptr + row[:, None] * DP + 2 * eh[None, :], acc_e, mask=r_ok[:, None])
        tl.store(o_ptr + row[:, None] * DP + 2 * eh[None, :] + 1, acc_o, mask=r_ok[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=r_ok)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=r_ok)
    else:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o_off = b * stride_ob + heads[:, None] * stride_oh + 2 * eh[None, :]
        o_mask = r_ok[:, None] & eh_ok[None, :]
        tl.store(o_ptr + o_off, (acc_e * inv[:, None]).to(o_ptr.dtype.element_ty), mask=o_mask)
        tl.store(o_ptr + o_off + 1, (acc_o * inv[:, None]).to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _kv4_combine_kernel(
    part_ptr, ml_ptr, o_ptr, d, n_split, stride_ob, stride_oh, n_heads,
    DP: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_wait(PDL)
    # One program = one (batch row, query head): merges the split partials in a fixed order (deterministic):
    # out = Σ_s acc_s e^{m_s - M} / Σ_s l_s e^{m_s - M}, M = max_s m_s; empty splits have m = -inf, l = 0.
    bh = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    e = tl.arange(0, DP)
    s_ok = s < n_split
    m = tl.load(ml_ptr + (bh * n_split + s) * 2, mask=s_ok, other=float("-inf"))
    ll = tl.load(ml_ptr + (bh * n_split + s) * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    acc = tl.load(part_ptr + (bh * n_split + s)[:, None] * DP + e[None, :], mask=s_ok[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(ll * w, axis=0)
    out = num / tl.where(den > 0, den, 1.0)
    b = bh // n_heads
    h = bh % n_heads
    tl.store(o_ptr + b * stride_ob + h * stride_oh + e, out.to(o_ptr.dtype.element_ty), mask=e < d)


def _check(q: Tensor, k_codes: Tensor, k_scale: Tensor, v_codes: Tensor, start: Tensor, length: Tensor,
           q_trans: Tensor | None = None) -> None:
    if q_trans is not None and tuple(q_trans.shape) != (q.shape[-1], q.shape[-1]):
        raise ValueError(f"q_trans must be ({q.shape[-1]}, {q.shape[-1]}), got {tuple(q_trans.shape)}")
    if q.dim() != 3 or k_codes.dim() != 4:
        raise ValueError(f"q must be (B, Hq, d) and the cache (B, Hkv, S, d/2), got {tuple(q.shape)}, "
                         f"{tuple(k_codes.shape)}")
    b, hq, d = q.shape
    if k_codes.shape[0] != b or k_codes.shape[3] * 2 != d or hq % k_codes.shape[1]:
        raise ValueError(f"cache {tuple(k_codes.shape)} does not fit queries {tuple(q.shape)}")
    if v_codes.shape != k_codes.shape or k_scale.shape != k_codes.shape[:3]:
        raise ValueError("K/V codes must have equal shapes and scales must be (B, Hkv, S)")
    if start.shape != (b,) or length.shape != (b,):
        raise ValueError("start and length must be (B,)")


def default_splits(batch: int, kv_heads: int, positions: int, block_t: int, sms: int, programs_per_sm: int = 2) -> int:
    """Position chunks per (row, KV head) for the flash-decoding grid: about ``programs_per_sm`` programs per SM
    over the cache's capacity (the grid depends on the capacity only, so a captured CUDA graph stays valid as the
    sequence grows), never more chunks than ``block_t`` tiles."""
    return max(1, min(triton.cdiv(programs_per_sm * sms, max(batch * kv_heads, 1)), triton.cdiv(positions, block_t)))


@dataclass(frozen=True, kw_only=True)
class DecodeLaunch:
    """Launch choices of :func:`kv4_decode_attention_triton` (see :func:`default_launch`)."""

    block_t: int  # cache positions per loop step
    num_warps: int
    num_stages: int
    swap: bool  # SWAP_AB: cache tiles on the MMA's M side, query heads on its N side
    programs_per_sm: int  # target of default_splits


def default_launch(batch: int, kv_heads: int, rep: int, sms: int) -> DecodeLaunch:
    """Default launch choices on CUDA for ``batch`` rows of ``kv_heads`` KV heads with ``rep`` query heads each.

    Measured on the H200 (``bench/probe_decode.py --sections attn``, bench/results/probe_decode_attn_h200.json;
    LLaMA-3-8B heads, 2048 cached positions), the swapped MMA layout (``SWAP_AB``: cache tiles on the M side, the
    GQA group of at most 8 query heads on the N side, half the tensor-core instructions) with the PTX unpack was the
    fastest at both batch sizes:

    * Few (row, KV head) pairs (``4 * batch * kv_heads <= sms``: batch <= 4 at 8 KV heads): latency-bound; tiles of
      128 positions, 4 warps, 2 stages, about 2 programs per SM: batch 1 6.7 us (unswapped 7.9, the plain unpack
      8.8; the previous kernel 9.4).
    * Many pairs: tiles of 64, 4 warps, 2 stages, about 4 programs per SM: batch 16 22.7 us (best split 21.8;
      unswapped 31.2, plain 39.1; the previous kernel 42).

    Both use the inline-PTX nibble unpack (``swar``), which is bit-identical to the plain one and removes the
    integer-to-float conversion (a low-throughput conversion-unit instruction, I2F in SASS) per cache element.
    """
    if 4 * batch * kv_heads <= sms:
        return DecodeLaunch(block_t=128, num_warps=4, num_stages=2, swap=rep <= 8, programs_per_sm=2)
    if rep > 8:  # the unswapped layout as measured (168 registers at tiles of 64: 3 programs of 4 warps per SM)
        return DecodeLaunch(block_t=64, num_warps=4, num_stages=2, swap=False, programs_per_sm=2)
    return DecodeLaunch(block_t=64, num_warps=4, num_stages=2, swap=True, programs_per_sm=4)


def kv4_decode_attention_triton(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor, v_scale: Tensor,
    v_zero: Tensor, start: Tensor, length: Tensor, sm_scale: float, q_trans: Tensor | None = None,
    block_t: int | None = None, splits: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, *, swar: bool = True, swap: bool | None = None,
) -> Tensor:  # (B, Hq, d)
    """Triton launcher of :func:`kv4_decode_attention` (interpreter on CPU tensors).

    ``splits`` position chunks per (row, KV head) run as separate programs (flash-decoding); their partial softmax
    sums are merged by a second kernel in a fixed order. 1 = one program per (row, KV head) and no merge.

    Every launch choice left at ``None`` comes from :func:`default_launch` (``splits``: :func:`default_splits` with
    its programs per SM); on CPU tensors the tiles are small (16 positions) and the warps and stages unused.

    Args:
        block_t: cache positions per loop step (at least 32 on CUDA).
        splits, num_warps, num_stages: grid and Triton launch options.
        swar: unpack the nibbles with inline PTX bit tricks (CUDA, bf16/fp16 queries; bit-identical to the plain
            unpack, which the interpreter and fp32 queries always use).
        swap: the swapped MMA layout (``SWAP_AB``: cache tiles on the M side, query heads on the N side); the same
            sums, its own accumulation order (not bit-identical to the unswapped layout).
        q_trans: see :func:`kv4_decode_attention` (applied in the kernel).
    """
    _check(q, k_codes, k_scale, v_codes, start, length, q_trans)
    b, hq, d = q.shape
    hkv, s_cap = k_codes.shape[1], k_codes.shape[2]
    rep = hq // hkv
    out = torch.empty_like(q)
    if b == 0:
        return out
    if k_codes.stride(3) != 1 or v_codes.stride() != k_codes.stride():
        k_codes, v_codes = k_codes.contiguous(), v_codes.contiguous()
    scales = [t.float().contiguous() for t in (k_scale, k_zero, v_scale, v_zero)]
    q = q.contiguous()
    cpu = on_cpu(q)
    kernel = cpu_kernel(_kv4_decode_attention_kernel) if cpu else _kv4_decode_attention_kernel
    sms = sm_count(q.device)
    dflt = default_launch(b, hkv, rep, sms)
    swap = dflt.swap if swap is None else swap
    block_t = block_t or (16 if cpu else dflt.block_t)
    if not cpu:
        # bf16/fp16 tl.dot with a reduction side of 16 gave wrong results on the H200 (Triton 3.6, measured):
        # keep both reduction sides (head_dim tile and position tile) at 32 or more.
        block_t = max(block_t, 32)
    if splits is None:
        splits = default_splits(b, hkv, s_cap, block_t, sms, dflt.programs_per_sm)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    chunk = triton.cdiv(triton.cdiv(max(s_cap, 1), splits), block_t) * block_t
    splits = max(1, triton.cdiv(s_cap, chunk))
    dp = next_pow2(d, floor=32 if cpu else 64)  # half-width (even/odd) dots of at least 16 / 32
    if splits > 1:
        part = torch.empty(b, hq, splits, dp, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part, ml = out, scales[0]
    f32_dot = cpu or q.dtype == torch.float32
    extra = launch_options(q.device, b, num_warps=num_warps or dflt.num_warps,
                           num_stages=dflt.num_stages if num_stages is None else num_stages)
    kernel[(b, hkv, splits)](
        q, k_codes, scales[0], scales[1], v_codes, scales[2], scales[3],
        start.to(torch.int32).contiguous(), length.to(torch.int32).contiguous(), part, ml,
        q_trans.to(q.dtype).contiguous() if q_trans is not None else q, rep, d, float(sm_scale), chunk,
        q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        scales[0].stride(0), scales[0].stride(1), out.stride(0), out.stride(1),
        REP_P=next_pow2(rep, floor=8 if swap else 16), DP=dp, BLOCK_T=block_t, F32_DOT=f32_dot, SPLIT=splits > 1,
        EVEN_D=d == dp, SWAR=swar and not f32_dot, SWAP_AB=swap, HAS_QT=q_trans is not None,
        Q_ROUND_BF16=cpu and q.dtype == torch.bfloat16, **extra,
    )
    if splits > 1:
        combine = cpu_kernel(_kv4_combine_kernel) if cpu else _kv4_combine_kernel
        combine[(b * hq,)](part, ml, out, d, splits, out.stride(0), out.stride(1), hq,
                           DP=dp, SP=next_pow2(splits, floor=2), **launch_options(q.device, b, num_warps=4))
    return out


def _kv4_decode_attention_fake(q: Tensor, **_: object) -> Tensor:
    return torch.empty_like(q)


@register_op("flatquant::kv4_decode_attention", cuda=kv4_decode_attention_triton, fake=_kv4_decode_attention_fake)
def kv4_decode_attention(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor, v_scale: Tensor,
    v_zero: Tensor, start: Tensor, length: Tensor, sm_scale: float, q_trans: Tensor | None = None,
) -> Tensor:
    """One decode step of attention reading the packed 4-bit KV cache directly.

    Args:
        q: ``(B, Hq, d)`` queries after RoPE (and after the K transform's inverse-transpose unless ``q_trans``
            is given).
        k_codes / v_codes: ``(B, Hkv, S, d/2)`` uint8 packed unsigned nibbles (per KV head; GQA not expanded).
        k_scale, k_zero, v_scale, v_zero: ``(B, Hkv, S)`` fp32 per-(position, head) scale and zero point.
        start / length: ``(B,)`` int32; row ``b`` attends to positions ``start[b] <= t < length[b]``.
        sm_scale: softmax scale (usually ``d ** -0.5``).
        q_trans: optional ``(d, d)``: the queries are ``q @ q_trans`` in q's dtype (the K transform's
            inverse-transpose, when the caller has not applied it).

    Returns:
        ``(B, Hq, d)`` in ``q.dtype``.
    """
    _check(q, k_codes, k_scale, v_codes, start, length, q_trans)
    if q_trans is not None:
        q = q @ q_trans.to(q.dtype)
    return ref.kv4_decode_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, start, length,
                                        sm_scale)
