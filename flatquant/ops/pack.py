"""int4 pack/unpack and the offline weight re-layout, as ``flatquant::`` ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference as ref
from ._launch import cpu_kernel, launch_options, nibble_hi, nibble_lo, on_cpu, pdl_wait
from ._register import register_op

_BLOCK = 1024


@triton.jit
def _pack_int4_kernel(c_ptr, p_ptr, n_bytes, BLOCK: tl.constexpr):
    # One program packs BLOCK output bytes: codes 2k (low nibble) and 2k+1 (high nibble).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    lo = tl.load(c_ptr + 2 * offs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(c_ptr + 2 * offs + 1, mask=mask, other=0).to(tl.int32)
    byte = (lo & 0xF) | ((hi & 0xF) << 4)
    tl.store(p_ptr + offs, byte.to(tl.uint8), mask=mask)


@triton.jit
def _unpack_int4_kernel(p_ptr, c_ptr, n_bytes, SIGNED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    # One program unpacks BLOCK bytes into 2*BLOCK contiguous int8 codes.
    pdl_wait(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(p_ptr + offs, mask=offs < n_bytes, other=0).to(tl.int8, bitcast=True)
    if SIGNED:
        lo = nibble_lo(b)
        hi = nibble_hi(b)
    else:
        lo = b & 0xF
        hi = (b >> 4) & 0xF
    codes = tl.reshape(tl.join(lo, hi), (2 * BLOCK,))
    offs2 = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(c_ptr + offs2, codes, mask=offs2 < 2 * n_bytes)


def _check_even(codes: Tensor) -> None:
    if codes.shape[-1] % 2:
        raise ValueError(f"last dimension must be even to pack int4, got {codes.shape[-1]}")


def pack_int4_triton(codes: Tensor) -> Tensor:  # (..., n) int8 -> (..., n/2) uint8
    """Triton launcher of :func:`pack_int4` (interpreter on CPU tensors)."""
    _check_even(codes)
    codes = codes.contiguous()
    out = torch.empty(*codes.shape[:-1], codes.shape[-1] // 2, dtype=torch.uint8, device=codes.device)
    n = out.numel()
    if n:
        kernel = cpu_kernel(_pack_int4_kernel) if on_cpu(codes) else _pack_int4_kernel
        kernel[(triton.cdiv(n, _BLOCK),)](codes, out, n, BLOCK=_BLOCK)
    return out


def unpack_int4_triton(
    packed: Tensor,  # (..., n/2) uint8
    signed: bool = True,
    out: Tensor | None = None,  # (..., n) int8, contiguous
) -> Tensor:  # (..., n) int8
    """Triton launcher of :func:`unpack_int4` (interpreter on CPU tensors); ``out``: a buffer to write into."""
    packed = packed.contiguous()
    shape = (*packed.shape[:-1], packed.shape[-1] * 2)
    if out is None:
        out = torch.empty(shape, dtype=torch.int8, device=packed.device)
    elif tuple(out.shape) != shape or out.dtype != torch.int8 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int8 tensor of shape {shape}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    n = packed.numel()
    if n:
        kernel = cpu_kernel(_unpack_int4_kernel) if on_cpu(packed) else _unpack_int4_kernel
        kernel[(triton.cdiv(n, _BLOCK),)](packed, out, n, SIGNED=signed, BLOCK=_BLOCK,
                                          **launch_options(packed.device, n // max(1, packed.shape[-1])))
    return out


def _pack_int4_fake(codes: Tensor, **_: object) -> Tensor:
    return codes.new_empty(*codes.shape[:-1], codes.shape[-1] // 2, dtype=torch.uint8)


@register_op("flatquant::pack_int4", cuda=pack_int4_triton, fake=_pack_int4_fake)
def pack_int4(codes: Tensor) -> Tensor:
    """Pack int4 codes ``(..., n)`` int8 into ``(..., n/2)`` uint8, element 2k in the low nibble."""
    _check_even(codes)
    return ref.pack_int4_ref(codes)


def _unpack_int4_fake(packed: Tensor, **_: object) -> Tensor:
    return packed.new_empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.int8)


@register_op("flatquant::unpack_int4", cuda=unpack_int4_triton, fake=_unpack_int4_fake)
def unpack_int4(packed: Tensor, signed: bool = True) -> Tensor:
    """Unpack ``(..., n/2)`` uint8 into ``(..., n)`` int8 codes (sign-extended when ``signed``)."""
    return ref.unpack_int4_ref(packed, signed)


def _halves_layout_fake(w_packed: Tensor, block_k: int, **_: object) -> Tensor:
    k = w_packed.shape[-1] * 2
    kp = -(-k // block_k) * block_k
    return w_packed.new_empty(w_packed.shape[0], kp // 2, dtype=torch.uint8)


@register_op("flatquant::int4_halves_layout", fake=_halves_layout_fake)
def int4_halves_layout(w_packed: Tensor, block_k: int = ref.W4A8_BLOCK_K) -> Tensor:
    """Offline re-layout of interleaved packed weights ``(N, K/2)`` for the W4A8 GEMM: ``(N, Kp/2)``, Kp padded
    to a multiple of ``block_k``; byte j of a K-tile holds elements j and j + block_k/2 (see ``reference``).

    One implementation for every device: it runs once per weight, at load time.
    """
    return ref.halves_layout_ref(w_packed, block_k)
