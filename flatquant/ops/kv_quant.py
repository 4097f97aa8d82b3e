"""KV-cache quantization for the cache write: ``flatquant::kv_quant`` and ``flatquant::kv_quant_write``.

Asymmetric, one scale and integer zero point per (token, head) over head_dim, with the layer's scalar LAC pair,
exactly :func:`flatquant.core.quant.quantize` (range including 0; zero-range rows map to (-1, 1)). An optional
per-head ``(d, d)`` transform is applied first (the K transform after RoPE). Codes are unsigned nibbles, packed.
``kv_quant_write`` does the same to the new tokens' K and V in one launch and stores the results straight into the
packed cache at the given positions (the engine's cache write).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, launch_options, next_pow2, on_cpu, pdl_wait
from ._register import register_op


@triton.jit
def _lac_quant_pack(y, clip_ptr, HP: tl.constexpr, DP: tl.constexpr, QMAX: tl.constexpr):
    """``(HP, DP)`` fp32 rows -> packed nibbles ``(HP, DP/2)`` int32 and the per-row ``scale``, ``zero``: the
    asymmetric LAC quantizer of :func:`flatquant.core.quant.quantize`, shared by both kernels of this file."""
    clip_lo = tl.load(clip_ptr)
    clip_hi = tl.load(clip_ptr + 1)
    hi = tl.maximum(tl.max(y, axis=1), 0.0) * clip_hi
    lo = tl.minimum(tl.min(y, axis=1), 0.0) * clip_lo
    empty = (hi - lo) <= 0
    hi = tl.where(empty, 1.0, hi)
    lo = tl.where(empty, -1.0, lo)
    scale = tl.math.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32))
    # Round half to even via (v + 1.5·2²³) − 1.5·2²³ (|v| is small: 0 <= -lo/s <= QMAX, and v is pre-clamped).
    zero = (tl.math.div_rn(-lo, scale) + 12582912.0) - 12582912.0
    v = tl.math.div_rn(y, tl.full(y.shape, 1.0, tl.float32) * scale[:, None])
    v = tl.minimum(tl.maximum(v, -QMAX - 1.0), QMAX + 1.0)
    q = ((v + 12582912.0) - 12582912.0) + zero[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
    lo_q, hi_q = tl.split(tl.reshape(q, (HP, DP // 2, 2)))
    byte = (lo_q & 0xF) | ((hi_q & 0xF) << 4)
    return byte, scale, zero


@triton.jit
def _head_transform(x, k_ptr, stride_k0, stride_k1, d, DP: tl.constexpr, HAS_TRANS: tl.constexpr,
                    F32_DOT: tl.constexpr):
    """``x @ trans`` in fp32 for the ``(HP, DP)`` tile ``x`` (``trans`` ``(d, d)`` at ``k_ptr``), or ``x`` in fp32."""
    if HAS_TRANS:
        ek = tl.arange(0, DP)
        e = tl.arange(0, DP)
        k = tl.load(k_ptr + ek[:, None] * stride_k0 + e[None, :] * stride_k1,
                    mask=(ek < d)[:, None] & (e < d)[None, :], other=0.0)
        if F32_DOT:
            y = tl.dot(x.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(x, k)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _kv_quant_kernel(
    x_ptr, k_ptr, clip_ptr, q_ptr, s_ptr, z_ptr,
    heads, d, stride_xt, stride_qt,
    HP: tl.constexpr, DP: tl.constexpr, HAS_TRANS: tl.constexpr, QMAX: tl.constexpr, F32_DOT: tl.constexpr,
):
    # One program = one token: rows are heads, columns head_dim.
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HP)
    e = tl.arange(0, DP)
    h_ok = h < heads
    e_ok = e < d
    x = tl.load(x_ptr + t * stride_xt + h[:, None] * d + e[None, :], mask=h_ok[:, None] & e_ok[None, :], other=0.0)
    y = _head_transform(x, k_ptr, d, 1, d, DP, HAS_TRANS, F32_DOT)
    byte, scale, zero = _lac_quant_pack(y, clip_ptr, HP, DP, QMAX)
    tl.store(s_ptr + t * heads + h, scale, mask=h_ok)
    tl.store(z_ptr + t * heads + h, zero, mask=h_ok)
    ee = tl.arange(0, DP // 2)
    half = d // 2
    tl.store(q_ptr + t * stride_qt + h[:, None] * half + ee[None, :], byte.to(tl.uint8),
             mask=h_ok[:, None] & (ee < half)[None, :])


@triton.jit
def _kv_write_side(
    x_ptr, stride_xb, stride_xt, stride_xh, stride_xe,
    k_ptr, stride_k0, stride_k1, clip_ptr,
    c_ptr, stride_cb, stride_ch, stride_cs, stride_ce,
    s_ptr, z_ptr, stride_sb, stride_sh, stride_ss,
    b, t, pos, heads, d,
    HP: tl.constexpr, DP: tl.constexpr, HAS_TRANS: tl.constexpr, QMAX: tl.constexpr, F32_DOT: tl.constexpr,
):
    """Token ``t`` of row ``b`` (``(heads, d)`` at ``x_ptr``): transform, quantize, pack, store at cache position
    ``pos`` of row ``b``; the same per-element arithmetic as ``_kv_quant_kernel``."""
    h = tl.arange(0, HP)
    e = tl.arange(0, DP)
    h_ok = h < heads
    e_ok = e < d
    h64 = h.to(tl.int64)
    x = tl.load(x_ptr + b * stride_xb + t * stride_xt + h64[:, None] * stride_xh + e[None, :] * stride_xe,
                mask=h_ok[:, None] & e_ok[None, :], other=0.0)
    y = _head_transform(x, k_ptr, stride_k0, stride_k1, d, DP, HAS_TRANS, F32_DOT)
    byte, scale, zero = _lac_quant_pack(y, clip_ptr, HP, DP, QMAX)
    s_off = b * stride_sb + h64 * stride_sh + pos * stride_ss
    tl.store(s_ptr + s_off, scale, mask=h_ok)
    tl.store(z_ptr + s_off, zero, mask=h_ok)
    ee = tl.arange(0, DP // 2)
    c_off = b * stride_cb + h64[:, None] * stride_ch + pos * stride_cs + ee[None, :] * stride_ce
    tl.store(c_ptr + c_off, byte.to(tl.uint8), mask=h_ok[:, None] & (ee < d // 2)[None, :])


@triton.jit
def _kv_quant_write_kernel(
    k_ptr, v_ptr, trans_ptr, k_clip_ptr, v_clip_ptr, idx_ptr,
    kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
    tokens, heads, d,
    stride_kb, stride_kt, stride_kh, stride_ke,
    stride_vb, stride_vt, stride_vh, stride_ve,
    stride_t0, stride_t1,
    stride_kcb, stride_kch, stride_kcs, stride_kce, stride_ksb, stride_ksh, stride_kss,
    stride_vcb, stride_vch, stride_vcs, stride_vce, stride_vsb, stride_vsh, stride_vss,
    HP: tl.constexpr, DP: tl.constexpr, HAS_TRANS: tl.constexpr, K_QMAX: tl.constexpr, V_QMAX: tl.constexpr,
    F32_DOT: tl.constexpr, PDL: tl.constexpr = False,
):
    # Grid (B * T, 2): program (b * T + t, side) writes token t of row b, side 0 = K (after its transform),
    # side 1 = V, at cache position idx[t] of row b; rows of the tile are heads, columns head_dim.
    pdl_wait(PDL)
    bt = tl.program_id(0).to(tl.int64)
    b = bt // tokens
    t = bt % tokens
    pos = tl.load(idx_ptr + t)
    if tl.program_id(1) == 0:
        _kv_write_side(k_ptr, stride_kb, stride_kt, stride_kh, stride_ke, trans_ptr, stride_t0, stride_t1,
                       k_clip_ptr, kc_ptr, stride_kcb, stride_kch, stride_kcs, stride_kce,
                       ks_ptr, kz_ptr, stride_ksb, stride_ksh, stride_kss,
                       b, t, pos, heads, d, HP, DP, HAS_TRANS, K_QMAX, F32_DOT)
    else:
        _kv_write_side(v_ptr, stride_vb, stride_vt, stride_vh, stride_ve, trans_ptr, stride_t0, stride_t1,
                       v_clip_ptr, vc_ptr, stride_vcb, stride_vch, stride_vcs, stride_vce,
                       vs_ptr, vz_ptr, stride_vsb, stride_vsh, stride_vss,
                       b, t, pos, heads, d, HP, DP, False, V_QMAX, F32_DOT)


def _check(x: Tensor, trans: Tensor | None, bits: int) -> None:
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be (tokens, heads, head_dim) with an even head_dim, got {tuple(x.shape)}")
    if trans is not None and tuple(trans.shape) != (x.shape[-1], x.shape[-1]):
        raise ValueError(f"trans must be (head_dim, head_dim), got {tuple(trans.shape)}")
    if not 2 <= bits <= 4:
        raise ValueError(f"kv_quant packs nibbles: bits must be in [2, 4], got {bits}")


def kv_quant_triton(
    x: Tensor,  # (T, H, d) fp16/bf16
    trans: Tensor | None,  # (d, d)
    clip: Tensor,  # (2,) fp32 [lo factor, hi factor]
    bits: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton launcher of :func:`kv_quant` (interpreter on CPU tensors)."""
    _check(x, trans, bits)
    t, h, d = x.shape
    x = x.contiguous()
    trans = trans.to(x.dtype).contiguous() if trans is not None else None
    codes = torch.empty(t, h, d // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(t, h, dtype=torch.float32, device=x.device)
    zero = torch.empty(t, h, dtype=torch.float32, device=x.device)
    if t == 0:
        return codes, scale, zero
    cpu = on_cpu(x)
    kernel = cpu_kernel(_kv_quant_kernel) if cpu else _kv_quant_kernel
    extra = {} if cpu else {"num_warps": 4, "num_stages": 1}
    kernel[(t,)](
        x, trans if trans is not None else x, clip.float().contiguous(), codes, scale, zero,
        h, d, x.stride(0), codes.stride(0),
        HP=next_pow2(h), DP=next_pow2(d, floor=16 if cpu else 32), HAS_TRANS=trans is not None, QMAX=2**bits - 1,
        F32_DOT=cpu or x.dtype == torch.float32, **extra,
    )
    return codes, scale, zero


def _kv_quant_fake(x: Tensor, **_: object) -> tuple[Tensor, Tensor, Tensor]:
    t, h, d = x.shape
    return (x.new_empty(t, h, d // 2, dtype=torch.uint8), x.new_empty(t, h, dtype=torch.float32),
            x.new_empty(t, h, dtype=torch.float32))


@register_op("flatquant::kv_quant", cuda=kv_quant_triton, fake=_kv_quant_fake)
def kv_quant(x: Tensor, trans: Tensor | None, clip: Tensor, bits: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric per-(token, head) KV quantization with LAC, packed.

    Args:
        x: ``(T, H, d)`` fp16/bf16 keys or values (per KV head, not expanded for GQA).
        trans: optional ``(d, d)`` per-head transform applied first (``x @ trans``).
        clip: ``(2,)`` fp32 LAC factors ``[σ(lo logit), σ(hi logit)]``.
        bits: code width (<= 4).

    Returns:
        ``codes`` ``(T, H, d/2)`` uint8 (unsigned nibbles), ``scale`` and ``zero`` ``(T, H)`` fp32;
        dequantize as ``(code - zero) * scale``.
    """
    _check(x, trans, bits)
    return ref.kv_quant_ref(x, trans, clip[0], clip[1], bits)


def _check_write(k: Tensor, v: Tensor, k_trans: Tensor | None, k_clip: Tensor, v_clip: Tensor,
                 caches: tuple[Tensor, ...], idx: Tensor, k_bits: int, v_bits: int) -> None:
    if k.dim() != 4 or k.shape[-1] % 2 or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, T, Hkv, head_dim) of one shape with an even head_dim, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if v.dtype != k.dtype or not k.dtype.is_floating_point:
        raise ValueError(f"k and v must share one floating dtype, got {k.dtype} and {v.dtype}")
    b, t, h, d = k.shape
    if k_trans is not None and tuple(k_trans.shape) != (d, d):
        raise ValueError(f"k_trans must be (head_dim, head_dim) = ({d}, {d}), got {tuple(k_trans.shape)}")
    if tuple(k_clip.shape) != (2,) or tuple(v_clip.shape) != (2,):
        raise ValueError(f"k_clip and v_clip must be (2,), got {tuple(k_clip.shape)} and {tuple(v_clip.shape)}")
    if not (2 <= k_bits <= 4 and 2 <= v_bits <= 4):
        raise ValueError(f"kv_quant_write packs nibbles: bits must be in [2, 4], got k_bits={k_bits}, v_bits={v_bits}")
    for side, (codes, scale, zero) in zip("kv", (caches[:3], caches[3:]), strict=True):
        s = codes.shape[2] if codes.dim() == 4 else -1
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (b, h, s, d // 2):
            raise ValueError(f"{side}_codes must be uint8 (B, Hkv, S, head_dim/2) = ({b}, {h}, S, {d // 2}), got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        if scale.dtype != torch.float32 or zero.dtype != torch.float32 or tuple(scale.shape) != (b, h, s) or \
                tuple(zero.shape) != (b, h, s) or scale.stride() != zero.stride():
            raise ValueError(f"{side}_scale and {side}_zero must be fp32 (B, Hkv, S) = ({b}, {h}, {s}) with equal "
                             f"strides, got {tuple(scale.shape)} and {tuple(zero.shape)}")
    if idx.dtype != torch.int64 or tuple(idx.shape) != (t,):
        raise ValueError(f"idx must be int64 (T,) = ({t},), got {idx.dtype} {tuple(idx.shape)}")
    if any(x.device != k.device for x in (v, k_clip, v_clip, idx, *caches, *(() if k_trans is None else (k_trans,)))):
        raise ValueError(f"kv_quant_write: every tensor must be on k's device {k.device}")


def kv_quant_write_triton(
    k: Tensor,  # (B, T, Hkv, d) fp16/bf16/fp32, any strides
    v: Tensor,  # (B, T, Hkv, d) k's dtype, any strides
    k_trans: Tensor | None,  # (d, d)
    k_clip: Tensor,  # (2,) fp32
    v_clip: Tensor,  # (2,) fp32
    k_codes: Tensor,  # (B, Hkv, S, d/2) uint8, written
    k_scale: Tensor,  # (B, Hkv, S) fp32, written
    k_zero: Tensor,  # (B, Hkv, S) fp32, written
    v_codes: Tensor,  # (B, Hkv, S, d/2) uint8, written
    v_scale: Tensor,  # (B, Hkv, S) fp32, written
    v_zero: Tensor,  # (B, Hkv, S) fp32, written
    idx: Tensor,  # (T,) int64 cache positions
    k_bits: int = 4,
    v_bits: int = 4,
) -> None:
    """Triton launcher of :func:`kv_quant_write` (interpreter on CPU tensors): one launch for K and V, strided
    reads, no allocation (``k_trans`` in k's dtype and contiguous fp32 clips are used as they are)."""
    caches = (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    _check_write(k, v, k_trans, k_clip, v_clip, caches, idx, k_bits, v_bits)
    b, t, h, d = k.shape
    if b * t == 0:
        return
    trans = k_trans.to(k.dtype) if k_trans is not None else None
    cpu = on_cpu(k)
    kernel = cpu_kernel(_kv_quant_write_kernel) if cpu else _kv_quant_write_kernel
    extra = launch_options(k.device, b * t, num_warps=4, num_stages=1)
    kernel[(b * t, 2)](
        k, v, trans if trans is not None else k, k_clip.float().contiguous(), v_clip.float().contiguous(), idx,
        *caches,
        t, h, d,
        *k.stride(), *v.stride(), *(trans.stride() if trans is not None else (0, 0)),
        *k_codes.stride(), *k_scale.stride(), *v_codes.stride(), *v_scale.stride(),
        HP=next_pow2(h), DP=next_pow2(d, floor=16 if cpu else 32), HAS_TRANS=trans is not None,
        K_QMAX=2**k_bits - 1, V_QMAX=2**v_bits - 1, F32_DOT=cpu or k.dtype == torch.float32, **extra,
    )


_KV_CACHE_ARGS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


@register_op("flatquant::kv_quant_write", cuda=kv_quant_write_triton, fake=lambda **_: None,
             mutates_args=_KV_CACHE_ARGS)
def kv_quant_write(
    k: Tensor,  # (B, T, Hkv, d)
    v: Tensor,  # (B, T, Hkv, d)
    k_trans: Tensor | None,  # (d, d)
    k_clip: Tensor,  # (2,) fp32
    v_clip: Tensor,  # (2,) fp32
    k_codes: Tensor,  # (B, Hkv, S, d/2) uint8
    k_scale: Tensor,  # (B, Hkv, S) fp32
    k_zero: Tensor,  # (B, Hkv, S) fp32
    v_codes: Tensor,  # (B, Hkv, S, d/2) uint8
    v_scale: Tensor,  # (B, Hkv, S) fp32
    v_zero: Tensor,  # (B, Hkv, S) fp32
    idx: Tensor,  # (T,) int64
    k_bits: int = 4,
    v_bits: int = 4,
) -> None:
    """Quantize the new tokens' K and V like :func:`kv_quant` and write them into the packed cache, in place.

    Codes, scales and zeros are bit-identical to ``kv_quant`` on each side followed by ``index_copy_`` of its
    outputs into the cache along the position dimension; on CUDA one kernel launch does both sides, reading K
    and V through their strides (the views of a fused QKV projection are used without a copy).

    Args:
        k: ``(B, T, Hkv, d)`` keys of the new tokens after RoPE (before the K transform), any strides.
        v: ``(B, T, Hkv, d)`` values, k's dtype, any strides.
        k_trans: optional ``(d, d)`` per-head K transform (``k @ k_trans``); V has none.
        k_clip, v_clip: ``(2,)`` fp32 LAC factors ``[σ(lo logit), σ(hi logit)]`` of K and V.
        k_codes, v_codes: ``(B, Hkv, S, d/2)`` uint8 packed caches (unsigned nibbles), written.
        k_scale, k_zero, v_scale, v_zero: ``(B, Hkv, S)`` fp32 caches, written (zero with its scale's strides).
        idx: ``(T,)`` int64: token ``t`` of row ``b`` goes to position ``idx[t]`` of row ``b``. The caller
            guarantees distinct positions in ``[0, S)``; they are not checked (that would synchronise the GPU),
            and out-of-range positions write out of bounds on CUDA.
        k_bits, v_bits: code widths, 2 to 4.
    """
    _check_write(k, v, k_trans, k_clip, v_clip, (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero), idx, k_bits,
                 v_bits)
    b, t, h, d = k.shape
    caches = ((k_codes, k_scale, k_zero), (v_codes, v_scale, v_zero))
    if k_bits == v_bits:  # both sides in one pass (per-row statistics: the same bits as one pass per side)
        clips = torch.stack([k_clip, v_clip]).float()[:, :, None, None, None]  # (2, 2, 1, 1, 1)
        kt = k.reshape(b * t, h, d)
        y = torch.stack([kt.float() @ k_trans.float() if k_trans is not None else kt.float(),
                         v.reshape(b * t, h, d).float()])
        codes, scale, zero = ref.kv_quant_ref(y, None, clips[:, 0], clips[:, 1], k_bits)
        outs = list(zip(codes, scale, zero, strict=True))
    else:
        outs = [ref.kv_quant_ref(x.reshape(b * t, h, d), trans, clip[0], clip[1], bits)
                for x, trans, clip, bits in ((k, k_trans, k_clip, k_bits), (v, None, v_clip, v_bits))]
    for (c, s, z), (codes, scale, zero) in zip(outs, caches, strict=True):
        codes.index_copy_(2, idx, c.view(b, t, h, d // 2).transpose(1, 2))
        scale.index_copy_(2, idx, s.view(b, t, h).transpose(1, 2))
        zero.index_copy_(2, idx, z.view(b, t, h).transpose(1, 2))
