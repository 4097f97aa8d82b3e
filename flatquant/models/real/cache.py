"""The KV cache: preallocated per layer and KV head, packed 4-bit codes or floating values; quantized writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ...core.kron import head_transform
from ...core.quant import fake_quant
from ...core.spec import QuantSpec
from ...ops import kv_quant, kv_quant_write
from ...ops.reference import dequantize_kv_ref
from .config import RealConfig, kv_packed


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache tensors, preallocated to ``max_len`` positions, per KV head.

    Packed (2-4 bit K or V): ``k`` ``(B, Hkv, S, d/2)`` uint8 and ``k_scale``/``k_zero`` ``(B, Hkv, S)`` fp32.
    Floating (K/V not packed): ``k`` ``(B, Hkv, S, d)`` in the compute dtype; scale/zero are empty.
    """

    k: Tensor
    k_scale: Tensor
    k_zero: Tensor
    v: Tensor
    v_scale: Tensor
    v_zero: Tensor


@dataclass
class KVCache:
    """The whole model's KV cache: per layer :class:`LayerKV`, the per-row start (left padding) and the number
    of positions written so far (the same for every row)."""

    layers: list[LayerKV]
    start: Tensor  # (B,) int32: first valid position of each row
    seen: int = 0
    padded: bool = False
    k_packed: bool = True
    v_packed: bool = True
    is_compileable: ClassVar[bool] = False  # transformers' cache protocol: generate() must not auto-compile

    @property
    def batch(self) -> int:
        """Batch rows."""
        return int(self.start.shape[0])

    @property
    def max_len(self) -> int:
        """Preallocated positions."""
        return int(self.layers[0].k.shape[2])

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (codes, scales and zeros)."""
        return sum(t.numel() * t.element_size() for lk in self.layers for t in (lk.k, lk.k_scale, lk.k_zero, lk.v,
                                                                                  lk.v_scale, lk.v_zero))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions written (transformers' cache protocol)."""
        return self.seen


def new_cache(cfg: RealConfig, batch: int, max_len: int, device: torch.device | str,
              start: Tensor | None = None) -> KVCache:
    """Allocate an empty cache for ``batch`` rows and ``max_len`` positions.

    Args:
        start: ``(B,)`` number of left-padding positions per row (None: no padding).
    """
    a = cfg.args
    hkv, d = a.n_kv_heads, a.head_dim
    kp, vp = kv_packed(cfg.qcfg.k), kv_packed(cfg.qcfg.v)

    def side(packed: bool) -> tuple[Tensor, Tensor, Tensor]:
        if packed:
            return (torch.zeros(batch, hkv, max_len, d // 2, dtype=torch.uint8, device=device),
                    torch.zeros(batch, hkv, max_len, dtype=torch.float32, device=device),
                    torch.zeros(batch, hkv, max_len, dtype=torch.float32, device=device))
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return torch.zeros(batch, hkv, max_len, d, dtype=cfg.dtype, device=device), empty, empty

    layers = [LayerKV(*side(kp), *side(vp)) for _ in range(a.n_layers)]
    st = torch.zeros(batch, dtype=torch.int32, device=device) if start is None else start.to(device, torch.int32)
    return KVCache(layers=layers, start=st, padded=start is not None and bool((st > 0).any()), k_packed=kp,
                   v_packed=vp)


def write_kv(x: Tensor, trans: Tensor | None, clip: Tensor, spec: QuantSpec, packed: bool,
              codes: Tensor, scale: Tensor, zero: Tensor, idx: Tensor) -> None:
    """Quantize ``x (B, Hkv, T, d)`` (after ``x @ trans``) and store it at positions ``idx (T,)``."""
    b, h, t, d = x.shape
    if packed:
        c, s, z = kv_quant(x.transpose(1, 2).reshape(b * t, h, d), trans, clip, spec.bits)
        codes.index_copy_(2, idx, c.view(b, t, h, d // 2).transpose(1, 2))
        scale.index_copy_(2, idx, s.view(b, t, h).transpose(1, 2))
        zero.index_copy_(2, idx, z.view(b, t, h).transpose(1, 2))
        return
    if trans is not None:
        x = head_transform(x, trans)
    if spec.enabled:
        x = fake_quant(x, spec, clip_lo=clip[0], clip_hi=clip[1])
    codes.index_copy_(2, idx, x.to(codes.dtype))


def write_kv_packed(k: Tensor, v: Tensor, k_trans: Tensor | None, k_clip: Tensor, v_clip: Tensor, k_bits: int,
                    v_bits: int, kv: LayerKV, idx: Tensor) -> None:
    """Quantize the new tokens' ``k`` (after ``k @ k_trans``) and ``v``, both ``(B, T, Hkv, d)`` with any strides,
    into the packed caches of ``kv`` at positions ``idx (T,)`` (distinct, ``< max_len``): one
    ``flatquant::kv_quant_write`` (one kernel launch on CUDA), the same codes as :func:`write_kv` on each side."""
    kv_quant_write(k, v, k_trans, k_clip, v_clip, kv.k, kv.k_scale, kv.k_zero, kv.v, kv.v_scale, kv.v_zero, idx,
                   k_bits, v_bits)


def read_kv(codes: Tensor, scale: Tensor, zero: Tensor, packed: bool, n: int, dtype: torch.dtype) -> Tensor:
    """The first ``n`` cached positions, dequantized: ``(B, Hkv, n, d)`` in ``dtype``."""
    if packed:
        return dequantize_kv_ref(codes[:, :, :n], scale[:, :, :n], zero[:, :, :n]).to(dtype)
    return codes[:, :, :n]
