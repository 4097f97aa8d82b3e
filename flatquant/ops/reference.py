"""Pure-torch references of every ``flatquant::`` op: the bit-exact spec the Triton kernels must match.

They run on any device and are the CPU kernels of the custom ops. Numerics (shared with the kernels):

* Kronecker transform ``leftᵀ X right`` with ``X`` the row-major ``(n1, n2)`` view of a token. ``X right`` is
  accumulated in fp32 and **rounded to the input dtype** (the one documented fp16/bf16 intermediate, so both
  products run on 16-bit tensor cores); ``leftᵀ (·)`` is accumulated in fp32 and kept in fp32.
* Quantization is :func:`flatquant.core.quant.quantize` on that fp32 tensor (range includes 0, LAC factors
  multiply the row max/min, IEEE division, round half to even), so the integer codes equal core's exactly.
* int4 packing: two's-complement (or unsigned, for asymmetric codes) nibbles, element ``2k`` in the low nibble
  of byte ``k``.
* GEMM: exact integer accumulation, then ``(acc_fp32 · s_a[m]) · s_w[n] (+ bias)`` in fp32, cast to the output dtype.
* KV cache: unsigned nibbles with a per-(token, head) scale and zero, value ``(code - zero) · scale``; decode
  attention dequantizes in fp32 and runs an fp32 softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatquant.core.quant import quantize
from flatquant.core.spec import QuantSpec

W4A8_BLOCK_K = 128
"""K-tile of the ``halves`` int4 weight layout used by the W4A8 GEMM (see :func:`halves_layout_ref`)."""


def pack_int4_ref(codes: Tensor) -> Tensor:  # (..., n) int8 -> (..., n // 2) uint8
    """Pack 4-bit codes (signed in [-8, 7] or unsigned in [0, 15]) two per byte, element 2k in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"last dimension must be even to pack int4, got {codes.shape[-1]}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4_ref(packed: Tensor, signed: bool = True) -> Tensor:  # (..., n/2) uint8 -> (..., n) int8
    """Inverse of :func:`pack_int4_ref`; ``signed`` sign-extends the nibbles (two's complement)."""
    out = packed.new_empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.int8)
    if signed:  # shift the nibble to the top of an int8, then an arithmetic shift sign-extends it
        b = packed.view(torch.int8)
        out[..., 0::2] = torch.bitwise_left_shift(b, 4) >> 4
        out[..., 1::2] = b >> 4
    else:
        b = packed.view(torch.uint8)
        out[..., 0::2] = b & 0xF
        out[..., 1::2] = b >> 4
    return out


def halves_layout_ref(w_packed: Tensor, block_k: int = W4A8_BLOCK_K) -> Tensor:  # (N, K/2) -> (N, Kp/2) uint8
    """Re-lay interleaved packed int4 weights so that byte ``j`` of each K-tile holds elements ``j`` (low nibble)
    and ``j + block_k/2`` (high nibble) of that tile; K is zero-padded to a multiple of ``block_k``.

    The W4A8 kernel then unpacks a tile with two shifts into two contiguous half-tiles that meet two contiguous
    halves of the int8 activation tile.
    """
    codes = unpack_int4_ref(w_packed, signed=True)  # (N, K)
    n, k = codes.shape
    kp = -(-k // block_k) * block_k
    codes = torch.nn.functional.pad(codes, (0, kp - k))
    tiles = codes.reshape(n, kp // block_k, 2, block_k // 2)
    lo, hi = tiles[:, :, 0].to(torch.int16) & 0xF, tiles[:, :, 1].to(torch.int16) & 0xF
    return (lo | (hi << 4)).to(torch.uint8).reshape(n, kp // 2)


def halves_to_codes_ref(w_halves: Tensor, block_k: int = W4A8_BLOCK_K) -> Tensor:  # (N, Kp/2) -> (N, Kp) int8
    """Inverse of :func:`halves_layout_ref` (the padded K stays)."""
    n = w_halves.shape[0]
    codes = unpack_int4_ref(w_halves, signed=True).reshape(n, -1, block_k // 2, 2).transpose(-1, -2)
    return codes.reshape(n, -1)


def kron_transform_ref(
    x: Tensor,  # (T, n1 * n2), fp16/bf16
    left: Tensor | None,  # (n1, n1) in x.dtype, or None for the identity
    right: Tensor | None,  # (n2, n2) in x.dtype, or None for the identity
    n1: int,
) -> Tensor:  # (T, n) fp32
    """``leftᵀ X right`` per token with the kernels' rounding (``X right`` rounded to ``x.dtype``), in fp32."""
    t, n = x.shape
    n2 = n // n1
    y = x.reshape(t, n1, n2).float()
    if right is not None:
        y = y @ right.float()
        if left is not None:
            y = y.to(x.dtype).float()
    if left is not None:
        y = left.float().mT @ y
    return y.reshape(t, n)


def kron_quant_ref(
    x: Tensor,  # (T, n1 * n2), fp16/bf16
    left: Tensor | None,  # (n1, n1)
    right: Tensor | None,  # (n2, n2)
    clip_lo: Tensor,  # () fp32, LAC factor on the row minimum (already sigmoided)
    clip_hi: Tensor,  # () fp32, LAC factor on the row maximum
    n1: int,
    bits: int = 4,
    pack: bool = True,
) -> tuple[Tensor, Tensor]:
    """Transform, clip and quantize per token symmetrically.

    Returns:
        ``codes``: ``(T, n/2)`` uint8 packed when ``pack`` (needs ``bits <= 4``), else ``(T, n)`` int8;
        ``scale``: ``(T,)`` fp32.
    """
    return _quantize_tokens(kron_transform_ref(x, left, right, n1), clip_lo, clip_hi, bits, pack)


def _quantize_tokens(y: Tensor, clip_lo: Tensor, clip_hi: Tensor, bits: int, pack: bool) -> tuple[Tensor, Tensor]:
    """Per-token symmetric codes (packed when ``pack``) and ``(T,)`` scales of transformed ``y (T, n)`` fp32."""
    codes, scale, _ = quantize(y, QuantSpec(bits=bits, sym=True), clip_lo=clip_lo.float(), clip_hi=clip_hi.float())
    return (pack_int4_ref(codes) if pack else codes), scale.squeeze(-1)


def kron_quant_multi_ref(
    x: Tensor,  # (T, n1 * n2), fp16/bf16
    left: Tensor | None,  # (n1, n1)
    right: Tensor | None,  # (n2, n2)
    clips: Tensor,  # (G, 2) fp32 LAC factors [lo, hi] per clip pair
    n1: int,
    bits: int = 4,
    pack: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`kron_quant_ref` for G clip pairs over one transform: ``(G, T, n/2 | n)`` codes, ``(G, T)`` scales."""
    y = kron_transform_ref(x, left, right, n1)
    c = clips.float()[:, :, None, None]  # (G, 2, 1, 1): one pass over (G, T, n), the same bits as G passes
    return _quantize_tokens(y.expand(c.shape[0], *y.shape), c[:, 0], c[:, 1], bits, pack)


def kv_quant_ref(
    x: Tensor,  # (T, H, d), fp16/bf16
    trans: Tensor | None,  # (d, d) per-head transform applied on the right first (K after RoPE), or None
    clip_lo: Tensor,  # () fp32
    clip_hi: Tensor,  # () fp32
    bits: int = 4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric per-(token, head) quantization over head_dim with LAC, packed unsigned nibbles.

    Returns:
        ``codes`` ``(T, H, d/2)`` uint8, ``scale`` ``(T, H)`` fp32, ``zero`` ``(T, H)`` fp32 (integer valued).
    """
    y = x.float()
    if trans is not None:
        y = y @ trans.float()
    spec = QuantSpec(bits=bits, sym=False)
    codes, scale, zero = quantize(y, spec, clip_lo=clip_lo.float(), clip_hi=clip_hi.float())
    return pack_int4_ref(codes), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_kv_ref(
    codes: Tensor,  # (..., d/2) uint8 unsigned nibbles
    scale: Tensor,  # (...) fp32
    zero: Tensor,  # (...) fp32
) -> Tensor:  # (..., d) fp32
    """``(code - zero) * scale`` of packed 4-bit KV codes, in fp32."""
    c = codes.to(torch.int16)
    q = torch.stack((c & 0xF, (c >> 4) & 0xF), dim=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
    return (q.float() - zero.float()[..., None]) * scale.float()[..., None]


def kv4_decode_attention_ref(
    q: Tensor,  # (B, Hq, d)
    k_codes: Tensor,  # (B, Hkv, S, d/2) uint8
    k_scale: Tensor,  # (B, Hkv, S) fp32
    k_zero: Tensor,  # (B, Hkv, S) fp32
    v_codes: Tensor,  # (B, Hkv, S, d/2) uint8
    v_scale: Tensor,  # (B, Hkv, S) fp32
    v_zero: Tensor,  # (B, Hkv, S) fp32
    start: Tensor,  # (B,) int32
    length: Tensor,  # (B,) int32
    sm_scale: float,
) -> Tensor:  # (B, Hq, d) in q.dtype
    """Softmax attention of one query per row over the dequantized cache positions ``[start, length)``, in fp32."""
    b, hq, _ = q.shape
    hkv, s = k_codes.shape[1], k_codes.shape[2]
    rep = hq // hkv
    k = dequantize_kv_ref(k_codes, k_scale, k_zero).repeat_interleave(rep, dim=1)  # (B, Hq, S, d)
    v = dequantize_kv_ref(v_codes, v_scale, v_zero).repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * sm_scale
    pos = torch.arange(s, device=q.device)
    valid = (pos[None, :] >= start[:, None].long()) & (pos[None, :] < length[:, None].long())  # (B, S)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhs,bhsd->bhd", p, v).to(q.dtype)


def int_matmul_ref(
    a: Tensor,  # (M, K) integer codes (any int dtype)
    w: Tensor,  # (N, K) integer codes
    a_scale: Tensor,  # (M,) fp32
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
    a_bits: int = 8,
    w_bits: int = 8,
) -> Tensor:  # (M, N)
    """Exact integer GEMM with the fp32 epilogue; ``a_bits``/``w_bits`` bound the codes' magnitudes.

    On CPU the codes are multiplied in fp32 when no partial sum can reach 2^24 (int4 × int4 up to
    K = 2^18), otherwise (and on GPUs) in fp64, exact below 2^53: both are exact; fp32 is many times faster.
    """
    bound = a.shape[-1] * 2 ** (a_bits - 1) * 2 ** (w_bits - 1)
    # fp32 only on CPU: a GPU fp32 matmul may run in TF32 (10-bit mantissa), which is not exact
    dt = torch.float32 if bound < 2**24 and a.device.type == "cpu" else torch.float64
    acc = (a.to(dt) @ w.to(dt).mT).to(torch.int32)
    return dequant_epilogue_ref(acc, a_scale, w_scale, bias, out_dtype)


def dequant_epilogue_ref(
    acc: Tensor,  # (M, N) int32 exact products
    a_scale: Tensor,  # (M,) fp32
    w_scale: Tensor,  # (N,) fp32
    bias: Tensor | None,  # (N,)
    out_dtype: torch.dtype,
) -> Tensor:  # (M, N)
    """The integer GEMMs' fp32 epilogue ``(acc · s_a[m]) · s_w[n] (+ bias[n])``, cast once to ``out_dtype``."""
    out = acc.float() * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def int8_mm_cpu(a: Tensor, w: Tensor) -> Tensor:  # (M, K) int8, (N, K) int8 -> (M, N) int32
    """Exact ``a @ wᵀ`` of int8 codes on CPU: ``torch._int_mm`` (about 4x an fp32 product at decode shapes on two
    cores), or an fp32 product (exact for int4 codes up to K = 2^18) where ``_int_mm`` refuses the shape."""
    try:
        return torch._int_mm(a, w.mT)
    except RuntimeError:
        return (a.float() @ w.float().mT).to(torch.int32)

