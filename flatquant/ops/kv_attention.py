"""Decode attention over the packed 4-bit KV cache: ``flatquant::kv4_decode_attention``.

The cache holds, per (batch row, KV head, position), ``head_dim/2`` bytes of unsigned nibbles (element ``2k`` in the
low nibble, as written by ``flatquant::kv_quant``) and an fp32 scale and integer-valued zero point; a value is
``(code - zero) * scale``. One query token per batch row attends to cache positions ``[start[b], length[b])``
(``start`` skips left padding). GQA is handled in the kernel: one program serves the ``n_heads / n_kv_heads``
query heads of a KV head, so the cache is read once per KV head and never expanded.

The reference (:func:`flatquant.ops.reference.kv4_decode_attention_ref`, the CPU kernel) dequantizes the cache in
fp32 and runs an fp32 softmax; the Triton kernel dequantizes tiles in registers and uses an online (flash-decoding
style) softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, next_pow2, on_cpu, sm_count
from ._register import register_op


@triton.jit
def _kv4_decode_attention_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, start_ptr, len_ptr, o_ptr,
    ml_ptr, rep, d, sm_scale, chunk,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh, stride_ob, stride_oh,
    REP_P: tl.constexpr, DP: tl.constexpr, BLOCK_T: tl.constexpr, F32_DOT: tl.constexpr, SPLIT: tl.constexpr,
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
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    DH: tl.constexpr = DP // 2
    r = tl.arange(0, REP_P)
    eh = tl.arange(0, DH)
    r_ok = r < rep
    eh_ok = eh < d // 2
    heads = g * rep + r
    q_off = b * stride_qb + heads[:, None] * stride_qh + 2 * eh[None, :]
    q_mask = r_ok[:, None] & eh_ok[None, :]
    if F32_DOT:
        dt = tl.float32
    else:
        dt = q_ptr.dtype.element_ty
    qe = (tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32) * sm_scale).to(dt)
    qo = (tl.load(q_ptr + q_off + 1, mask=q_mask, other=0.0).to(tl.float32) * sm_scale).to(dt)
    q_sum = tl.sum(qe.to(tl.float32), axis=1) + tl.sum(qo.to(tl.float32), axis=1)  # (REP_P,)
    t_lo = tl.maximum(tl.load(start_ptr + b), sp * chunk)
    t_hi = tl.minimum(tl.load(len_ptr + b), sp * chunk + chunk)
    m_i = tl.full((REP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((REP_P,), tl.float32)
    corr = tl.zeros((REP_P,), tl.float32)
    acc_e = tl.zeros((REP_P, DH), tl.float32)
    acc_o = tl.zeros((REP_P, DH), tl.float32)
    c_base = b * stride_cb + g * stride_ch
    s_base = b * stride_sb + g * stride_sh
    for t0 in range((t_lo // BLOCK_T) * BLOCK_T, t_hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = (t >= t_lo) & (t < t_hi)
        c_off = c_base + t[:, None].to(tl.int64) * stride_ct + eh[None, :]
        c_mask = t_ok[:, None] & eh_ok[None, :]
        kb = tl.load(kc_ptr + c_off, mask=c_mask, other=0).to(tl.int32)
        vb = tl.load(vc_ptr + c_off, mask=c_mask, other=0).to(tl.int32)
        ks = tl.load(ks_ptr + s_base + t, mask=t_ok, other=0.0)
        kz = tl.load(kz_ptr + s_base + t, mask=t_ok, other=0.0)
        vs = tl.load(vs_ptr + s_base + t, mask=t_ok, other=0.0)
        vz = tl.load(vz_ptr + s_base + t, mask=t_ok, other=0.0)
        k_lo = (kb & 0xF).to(dt)
        k_hi = ((kb >> 4) & 0xF).to(dt)
        if F32_DOT:
            qc = tl.dot(qe, tl.trans(k_lo), input_precision="ieee") + tl.dot(qo, tl.trans(k_hi),
                                                                            input_precision="ieee")
        else:
            qc = tl.dot(qe, tl.trans(k_lo)) + tl.dot(qo, tl.trans(k_hi))  # (REP_P, BLOCK_T) fp32
        s = (qc - q_sum[:, None] * kz[None, :]) * ks[None, :]
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = (p * vs[None, :]).to(dt)  # rounded once; the zero correction uses the same rounded weights
        corr = corr * alpha + tl.sum(pv.to(tl.float32) * vz[None, :], axis=1)
        v_lo = (vb & 0xF).to(dt)
        v_hi = ((vb >> 4) & 0xF).to(dt)
        if F32_DOT:
            acc_e = acc_e * alpha[:, None] + tl.dot(pv, v_lo, input_precision="ieee")
            acc_o = acc_o * alpha[:, None] + tl.dot(pv, v_hi, input_precision="ieee")
        else:
            acc_e = acc_e * alpha[:, None] + tl.dot(pv, v_lo)
            acc_o = acc_o * alpha[:, None] + tl.dot(pv, v_hi)
        m_i = m_new
    acc_e = acc_e - corr[:, None]
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
        tl.store(o_ptr + o_off, (acc_e * inv[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask)
        tl.store(o_ptr + o_off + 1, (acc_o * inv[:, None]).to(o_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _kv4_combine_kernel(
    part_ptr, ml_ptr, o_ptr, d, n_split, stride_ob, stride_oh, n_heads,
    DP: tl.constexpr, SP: tl.constexpr,
):
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


def _check(q: Tensor, k_codes: Tensor, k_scale: Tensor, v_codes: Tensor, start: Tensor, length: Tensor) -> None:
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


def default_splits(batch: int, kv_heads: int, positions: int, block_t: int, sms: int) -> int:
    """Position chunks per (row, KV head) for the flash-decoding grid: about two programs per SM over the
    cache's capacity (the grid depends on the capacity only, so a captured CUDA graph stays valid as the sequence
    grows), never more chunks than ``block_t`` tiles."""
    return max(1, min(triton.cdiv(2 * sms, max(batch * kv_heads, 1)), triton.cdiv(positions, block_t)))


def kv4_decode_attention_triton(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor, v_scale: Tensor,
    v_zero: Tensor, start: Tensor, length: Tensor, sm_scale: float, block_t: int | None = None,
    splits: int | None = None, num_warps: int = 4, num_stages: int = 2,
) -> Tensor:  # (B, Hq, d)
    """Triton launcher of :func:`kv4_decode_attention` (interpreter on CPU tensors).

    ``splits`` position chunks per (row, KV head) run as separate programs (flash-decoding); their partial softmax
    sums are merged by a second kernel in a fixed order. Default :func:`default_splits`; 1 = one program per
    (row, KV head) and no merge.
    """
    _check(q, k_codes, k_scale, v_codes, start, length)
    b, hq, d = q.shape
    hkv, s_cap = k_codes.shape[1], k_codes.shape[2]
    out = torch.empty_like(q)
    if b == 0:
        return out
    if k_codes.stride(3) != 1 or v_codes.stride() != k_codes.stride():
        k_codes, v_codes = k_codes.contiguous(), v_codes.contiguous()
    scales = [t.float().contiguous() for t in (k_scale, k_zero, v_scale, v_zero)]
    q = q.contiguous()
    cpu = on_cpu(q)
    kernel = cpu_kernel(_kv4_decode_attention_kernel) if cpu else _kv4_decode_attention_kernel
    # H200 (bench/results/probe_decode_h200.json): position tiles of 128 when few (row, KV head) pairs share the
    # GPU (batch 1, 8 KV heads: 9.4 vs 10.8 us), 64 otherwise (batch 16: 41.8 vs 42.4 us).
    block_t = block_t or (16 if cpu else (128 if 4 * b * hkv <= sm_count(q.device) else 64))
    if not cpu:
        # bf16/fp16 tl.dot with a reduction side of 16 gave wrong results on the H200 (Triton 3.6, measured):
        # keep both reduction sides (head_dim tile and position tile) at 32 or more.
        block_t = max(block_t, 32)
    if splits is None:
        splits = default_splits(b, hkv, s_cap, block_t, sm_count(q.device))
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
    extra = {} if cpu else {"num_warps": num_warps, "num_stages": num_stages}
    kernel[(b, hkv, splits)](
        q, k_codes, scales[0], scales[1], v_codes, scales[2], scales[3],
        start.to(torch.int32).contiguous(), length.to(torch.int32).contiguous(), part, ml,
        hq // hkv, d, float(sm_scale), chunk,
        q.stride(0), q.stride(1), k_codes.stride(0), k_codes.stride(1), k_codes.stride(2),
        scales[0].stride(0), scales[0].stride(1), out.stride(0), out.stride(1),
        REP_P=next_pow2(hq // hkv), DP=dp, BLOCK_T=block_t,
        F32_DOT=cpu or q.dtype == torch.float32, SPLIT=splits > 1, **extra,
    )
    if splits > 1:
        combine = cpu_kernel(_kv4_combine_kernel) if cpu else _kv4_combine_kernel
        combine[(b * hq,)](part, ml, out, d, splits, out.stride(0), out.stride(1), hq,
                           DP=dp, SP=next_pow2(splits, floor=2), **({} if cpu else {"num_warps": 4}))
    return out


def _kv4_decode_attention_fake(q: Tensor, **_: object) -> Tensor:
    return torch.empty_like(q)


@register_op("flatquant::kv4_decode_attention", cuda=kv4_decode_attention_triton, fake=_kv4_decode_attention_fake)
def kv4_decode_attention(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor, v_scale: Tensor,
    v_zero: Tensor, start: Tensor, length: Tensor, sm_scale: float,
) -> Tensor:
    """One decode step of attention reading the packed 4-bit KV cache directly.

    Args:
        q: ``(B, Hq, d)`` queries (RoPE and the K transform's inverse-transpose already applied).
        k_codes / v_codes: ``(B, Hkv, S, d/2)`` uint8 packed unsigned nibbles (per KV head; GQA not expanded).
        k_scale, k_zero, v_scale, v_zero: ``(B, Hkv, S)`` fp32 per-(position, head) scale and zero point.
        start / length: ``(B,)`` int32; row ``b`` attends to positions ``start[b] <= t < length[b]``.
        sm_scale: softmax scale (usually ``d ** -0.5``).

    Returns:
        ``(B, Hq, d)`` in ``q.dtype``.
    """
    _check(q, k_codes, k_scale, v_codes, start, length)
    return ref.kv4_decode_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, start, length,
                                        sm_scale)
