"""KV-cache quantization for the cache write: ``flatquant::kv_quant``.

Asymmetric, one scale and integer zero point per (token, head) over head_dim, with the layer's scalar LAC pair,
exactly :func:`flatquant.core.quant.quantize` (range including 0; zero-range rows map to (-1, 1)). An optional
per-head ``(d, d)`` transform is applied first (the K transform after RoPE). Codes are unsigned nibbles, packed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, next_pow2, on_cpu
from ._register import register_op


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
    if HAS_TRANS:
        ek = tl.arange(0, DP)
        k = tl.load(k_ptr + ek[:, None] * d + e[None, :], mask=(ek < d)[:, None] & e_ok[None, :], other=0.0)
        if F32_DOT:
            y = tl.dot(x.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            y = tl.dot(x, k)
    else:
        y = x.to(tl.float32)

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
    tl.store(s_ptr + t * heads + h, scale, mask=h_ok)
    tl.store(z_ptr + t * heads + h, zero, mask=h_ok)

    lo_q, hi_q = tl.split(tl.reshape(q, (HP, DP // 2, 2)))
    byte = (lo_q & 0xF) | ((hi_q & 0xF) << 4)
    ee = tl.arange(0, DP // 2)
    half = d // 2
    tl.store(q_ptr + t * stride_qt + h[:, None] * half + ee[None, :], byte.to(tl.uint8),
             mask=h_ok[:, None] & (ee < half)[None, :])


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
        HP=next_pow2(h), DP=next_pow2(d), HAS_TRANS=trans is not None, QMAX=2**bits - 1,
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
