"""The real-quantized inference model: packed int4 weights, online transforms, KV4 cache.

Per decoder layer (the same function as :func:`flatquant.models.layer.layer_forward` on a folded layer, with
the same :class:`~flatquant.core.spec.QuantConfig`):

1. RMSNorm (diag scale merged), then for each of q/k/v: ``flatquant::kron_quant`` (ln transform + that linear's
   LAC + per-token quantization) and the integer GEMM (``w4a4_matmul``, or W4A8/W8A8) with an fp32 epilogue, + bias;
2. RoPE; ``q ← q K^{-T}``; the K transform and the KV quantization (asymmetric per (token, KV head), learned K/V
   clipping) run in ``flatquant::kv_quant`` and the packed codes go into the cache — in prefill too, so prefill
   attention sees exactly the KV4 error of the fake path;
3. attention over the dequantized 4-bit cache (prefill: SDPA on the dequantized positions; decode:
   ``flatquant::kv4_decode_attention``, which reads the packed cache directly); GQA caches hold ``n_kv_heads``;
4. o_proj: head mixing + quantization in ``kron_quant``, GEMM; MLP likewise (up_gate and down transforms).

On CPU the ops run their torch references, on CUDA the Triton kernels (the ops dispatch by device). Bit settings
the kernels do not support (e.g. W4A16, asymmetric activations, per-group weights) run the fake path per linear
(:class:`FakeLinear`) with a logged notice. KV bit widths other than 2-4 use a floating cache holding the
fake-quantized values.

Layer tensors (the checkpoint schema, see :func:`layer_from_tensors`): ``input_norm``, ``post_norm``;
``{linear}.qweight`` (packed ``(N, K/2)`` uint8, or ``(N, K)`` int8 for 8-bit weights), ``{linear}.w_scale``
``(N,)`` fp32, optional ``{linear}.bias``, ``{linear}.a_clip`` ``(2,)`` fp32 LAC factors ``[σ(lo), σ(hi)]``
(or ``{linear}.weight`` float for the fake fallback); ``ln_trans|up_gate_trans|down_trans.left|right``,
``o_trans``, ``k_trans``, ``k_trans_inv_t``; ``q_quant|k_cache|v_cache.clip`` ``(2,)`` fp32.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.kron import head_mix, head_transform, kron_transform
from ..core.quant import fake_quant
from ..core.spec import QuantConfig, QuantSpec
from ..ops import kron_quant, kron_quant_multi, kv_quant, pack_int4, w4a4_matmul
from ..ops import reference as ref
from ..ops.kv_attention import dequantize_kv_ref, kv4_decode_attention
from ..ops.matmul import GEMV_MAX_M
from ..ops.qlinear import QLinearParams, qlinear
from .args import LINEARS, ModelArgs
from .layer import Rope, apply_rope, rms_norm

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
SITE_OF = {"q_proj": "ln_trans", "k_proj": "ln_trans", "v_proj": "ln_trans", "gate_proj": "up_gate_trans",
           "up_proj": "up_gate_trans", "down_proj": "down_trans"}
FUSED_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
"""Linears that read one transformed activation and run as one :class:`FusedQLinear` on the W4A4 path."""


def kernel_supported(qcfg: QuantConfig) -> bool:
    """Whether the integer kernels implement ``qcfg``'s weight/activation quantizers (else: fake fallback)."""
    w, a = qcfg.w, qcfg.a
    return ((a.bits, w.bits) in ((4, 4), (8, 4), (8, 8)) and w.sym and a.sym
            and w.granularity == "per_channel" and a.granularity == "per_token")


def kv_packed(spec: QuantSpec) -> bool:
    """Whether a K/V quantizer is stored as packed nibbles (asymmetric per token and head, 2-4 bits)."""
    return spec.enabled and not spec.sym and spec.bits <= 4 and spec.granularity == "per_token"


@dataclass(frozen=True, kw_only=True)
class RealConfig:
    """Static description of a real model.

    Attributes:
        args: architecture.
        qcfg: bit settings (the fake model's :class:`QuantConfig`).
        dtype: compute dtype of activations (bf16/fp16 on GPU; fp32 on CPU reproduces the fp32 fake model).
        rope_scaling: HF's ``attention_scaling`` on cos/sin.
        real_linears: integer kernels (True) or the fake fallback (False).
        fuse: run q/k/v and gate/up as one transform + quantize and one weight (W4A4; :class:`FusedQLinear`).
        cpu_codes: on CPU, also keep the W4A4 weight codes unpacked as int8 (one byte per weight, twice the packed
            size), so the CPU GEMM runs ``torch._int_mm`` without unpacking them on every call (same results;
            :func:`gemm4`).
    """

    args: ModelArgs
    qcfg: QuantConfig
    dtype: torch.dtype = torch.bfloat16
    rope_scaling: float = 1.0
    real_linears: bool = True
    fuse: bool = True
    cpu_codes: bool = True

    def __post_init__(self) -> None:
        assert self.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {self.dtype}"
        assert not (self.real_linears and not kernel_supported(self.qcfg)), "kernels do not support these bits"


@dataclass(frozen=True, kw_only=True)
class FakeLinear:
    """Fallback linear: online transform, fake activation quantization, dequantized weight (the fake path)."""

    weight: Tensor  # (N, K) compute dtype
    bias: Tensor | None
    clip: Tensor  # (2,) fp32
    spec: QuantSpec
    left: Tensor | None = None  # (n1, n1)
    right: Tensor | None = None  # (n2, n2)

    def __call__(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        """The fake-quantized linear of ``x``."""
        if self.left is not None and self.right is not None:
            x = kron_transform(x, self.left, self.right)
        elif self.left is not None:
            x = head_mix(x, self.left)
        if self.spec.enabled:
            x = fake_quant(x, self.spec, clip_lo=self.clip[0], clip_hi=self.clip[1])
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True, kw_only=True)
class FusedQLinear:
    """W4A4 linears that share one online transform (q/k/v, gate/up), each with its own LAC pair.

    One ``flatquant::kron_quant_multi`` transforms the input once and writes one set of codes per linear. At up to
    ``GEMV_MAX_M`` rows in all (decode), one split-K GEMM runs over the concatenated weights with the code sets
    stacked as rows, and each linear keeps its own diagonal block (the extra rows are free: the MMA pads the token
    side to 16); with more rows, one GEMM per linear over its slice of the concatenated weights.
    """

    weight: Tensor  # (N_total, K/2) uint8, the linears' packed rows one after another
    w_scale: Tensor  # (N_total,) fp32
    bias: Tensor | None  # (N_total,) or None (zeros for linears without a bias when another has one)
    clips: Tensor  # (G, 2) fp32
    sizes: tuple[int, ...]  # output features of each linear
    left: Tensor | None = None  # (n1, n1)
    right: Tensor | None = None  # (n2, n2)
    n1: int = 1

    def __call__(self, x: Tensor, cpu_codes: Tensor | None = None) -> list[Tensor]:  # (B, T, K) -> G x (B, T, N_g)
        """The outputs of the G linears (``cpu_codes``: the weight codes unpacked to fp32, see :func:`gemm4`)."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m, g = x2.shape[0], len(self.sizes)
        codes, scale = kron_quant_multi(x2, self.left, self.right, self.clips, self.n1, 4, True)
        bounds = [0]
        for n in self.sizes:
            bounds.append(bounds[-1] + n)
        if m * g <= GEMV_MAX_M:
            out = gemm4(codes.reshape(g * m, -1), scale.reshape(g * m), self.weight, self.w_scale, self.bias,
                        x.dtype, cpu_codes).view(g, m, -1)
            return [out[i, :, bounds[i]:bounds[i + 1]].reshape(*lead, self.sizes[i]) for i in range(g)]
        outs = []
        for i in range(g):
            lo, hi = bounds[i], bounds[i + 1]
            bias = None if self.bias is None else self.bias[lo:hi]
            y = gemm4(codes[i], scale[i], self.weight[lo:hi], self.w_scale[lo:hi], bias, x.dtype,
                      None if cpu_codes is None else cpu_codes[lo:hi])
            outs.append(y.reshape(*lead, hi - lo))
        return outs


def gemm4(codes: Tensor, scale: Tensor, weight: Tensor, w_scale: Tensor, bias: Tensor | None, dtype: torch.dtype,
          cpu_codes: Tensor | None = None) -> Tensor:  # (M, K/2) packed codes -> (M, N)
    """W4A4 GEMM: ``flatquant::w4a4_matmul``, or on CPU with ``cpu_codes`` ((N, K) int8 weight codes unpacked once at
    load) an exact int8 product (:func:`~flatquant.ops.reference.int8_mm_cpu`) and the same fp32 epilogue, without
    unpacking the weight on every call (the same result as the reference)."""
    if cpu_codes is None:
        return w4a4_matmul(codes, scale, weight, w_scale, bias, dtype)
    acc = ref.int8_mm_cpu(ref.unpack_int4_ref(codes), cpu_codes)
    return ref.dequant_epilogue_ref(acc, scale, w_scale, bias, dtype)


def fuse_linears(lins: list[QLinearParams]) -> FusedQLinear | None:
    """One :class:`FusedQLinear` for W4A4 linears with the same online transform, else None."""
    first = lins[0]
    if any(p.a_bits != 4 or p.w_bits != 4 or p.left is not first.left or p.right is not first.right
           or p.n1 != first.n1 for p in lins):
        return None
    if (first.in_features // first.n1) % 2:
        return None  # an odd right factor packs after the transform (real_linear); keep those separate
    bias = None
    given = [p.bias for p in lins if p.bias is not None]
    if given:
        bias = torch.cat([p.bias if p.bias is not None else given[0].new_zeros(p.out_features) for p in lins])
    return FusedQLinear(weight=torch.cat([p.weight for p in lins]), w_scale=torch.cat([p.w_scale for p in lins]),
                        bias=bias, clips=torch.stack([p.clip for p in lins]),
                        sizes=tuple(p.out_features for p in lins), left=first.left, right=first.right, n1=first.n1)


Linear = QLinearParams | FakeLinear


@dataclass(frozen=True, kw_only=True)
class RealLayer:
    """One decoder layer's inference tensors."""

    input_norm: Tensor  # (hidden,)
    post_norm: Tensor  # (hidden,)
    linears: dict[str, Linear]
    fused: dict[str, FusedQLinear]  # FUSED_GROUPS name -> fused linears (W4A4 only; empty otherwise)
    cpu_codes: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # linear or group -> (N, K) int8 codes
    k_trans: Tensor | None  # (d, d)
    k_trans_inv_t: Tensor | None  # (d, d)
    q_norm: Tensor | None  # (d,) Qwen3 per-head RMSNorm weights before RoPE
    k_norm: Tensor | None  # (d,)
    q_clip: Tensor  # (2,) fp32
    k_clip: Tensor  # (2,) fp32
    v_clip: Tensor  # (2,) fp32


@dataclass(frozen=True, kw_only=True)
class RealWeights:
    """A whole real model: config, top-level tensors (``embed``, ``final_norm``, ``lm_head``, ``rope.inv_freq``)
    and layers."""

    cfg: RealConfig
    top: Params
    layers: tuple[RealLayer, ...]

    @property
    def device(self) -> torch.device:
        """Device of the embedding table."""
        return self.top["embed"].device


def _ones_clip(device: torch.device) -> Tensor:
    return torch.ones(2, dtype=torch.float32, device=device)


def layer_from_tensors(t: Params, cfg: RealConfig) -> RealLayer:
    """Build a :class:`RealLayer` from its checkpoint tensors (see the module docstring), cast to ``cfg.dtype``."""
    dt = cfg.dtype
    dev = t["input_norm"].device

    def fl(k: str) -> Tensor | None:
        return t[k].to(dt) if k in t else None

    linears: dict[str, Linear] = {}
    factors: dict[str | None, tuple[Tensor | None, Tensor | None]] = {}
    for n in LINEARS:
        site = SITE_OF.get(n)
        if site not in factors:  # one tensor per site, so linears of a site share (and can fuse) it
            factors[site] = (fl(f"{site}.left") if site else fl("o_trans"), fl(f"{site}.right") if site else None)
        left, right = factors[site]
        clip = t.get(f"{n}.a_clip", _ones_clip(dev)).float()
        bias = fl(f"{n}.bias")
        if cfg.real_linears:
            n1 = left.shape[0] if left is not None else 1
            linears[n] = QLinearParams(
                weight=t[f"{n}.qweight"], w_scale=t[f"{n}.w_scale"].float(), bias=bias,
                weight_halves=(torch.ops.flatquant.int4_halves_layout(t[f"{n}.qweight"])
                               if (cfg.qcfg.a.bits, cfg.qcfg.w.bits) == (8, 4) else None),
                left=left, right=right, n1=n1, clip=clip,
                a_bits=cfg.qcfg.a.bits, w_bits=cfg.qcfg.w.bits)
        else:
            linears[n] = FakeLinear(weight=t[f"{n}.weight"].to(dt), bias=bias, clip=clip, spec=cfg.qcfg.a,
                                    left=left, right=right)
    fused: dict[str, FusedQLinear] = {}
    if cfg.real_linears and cfg.fuse:
        for name, group in FUSED_GROUPS.items():
            lins = [linears[n] for n in group]
            f = fuse_linears(lins) if all(isinstance(p, QLinearParams) for p in lins) else None  # type: ignore[arg-type]
            if f is not None:
                fused[name] = f
                for n in group:  # the fused copy replaces the separate weights (no second copy in memory)
                    p = linears[n]
                    assert isinstance(p, QLinearParams)
                    linears[n] = dataclasses.replace(p, weight=p.weight.new_empty(0, p.weight.shape[1]))
    cpu_codes: dict[str, Tensor] = {}
    if cfg.real_linears and cfg.cpu_codes and dev.type == "cpu":
        packed = {**{n: p.weight for n, p in linears.items() if isinstance(p, QLinearParams) and p.a_bits == 4
                     and p.w_bits == 4 and p.weight.shape[0]},
                  **{g: f.weight for g, f in fused.items()}}
        cpu_codes = {n: ref.unpack_int4_ref(w) for n, w in packed.items()}
    return RealLayer(
        input_norm=t["input_norm"].to(dt), post_norm=t["post_norm"].to(dt), linears=linears, fused=fused,
        cpu_codes=cpu_codes,
        k_trans=fl("k_trans"), k_trans_inv_t=fl("k_trans_inv_t"), q_norm=fl("q_norm"), k_norm=fl("k_norm"),
        q_clip=t.get("q_quant.clip", _ones_clip(dev)).float(), k_clip=t.get("k_cache.clip", _ones_clip(dev)).float(),
        v_clip=t.get("v_cache.clip", _ones_clip(dev)).float())


# ----------------------------------------------------------------------------------------------------------------
# KV cache


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


# ----------------------------------------------------------------------------------------------------------------
# forward


def real_linear(x: Tensor, p: QLinearParams, cpu_codes: Tensor | None = None) -> Tensor:  # (..., K) -> (..., N)
    """:func:`flatquant.ops.qlinear` (``real``), also for an odd right factor (the activation codes are then
    packed by ``pack_int4`` after the fused transform + quantize instead of inside it); ``cpu_codes``: see
    :func:`gemm4`."""
    k = x.shape[-1]
    if p.a_bits != 4:
        return qlinear(x, p, "real")
    even = (k // p.n1) % 2 == 0
    codes, scale = kron_quant(x.reshape(-1, k), p.left, p.right, p.clip, p.n1, 4, even)
    out = gemm4(codes if even else pack_int4(codes), scale, p.weight, p.w_scale, p.bias, x.dtype, cpu_codes)
    return out.reshape(*x.shape[:-1], p.out_features)


def _linear(layer: RealLayer, name: str, x: Tensor) -> Tensor:  # (B, T, K) -> (B, T, N)
    lin = layer.linears[name]
    if isinstance(lin, FakeLinear):
        return lin(x)
    return real_linear(x, lin, layer.cpu_codes.get(name))


def _project(layer: RealLayer, group: str, h: Tensor) -> list[Tensor]:  # (B, T, K) -> G x (B, T, N_g)
    """The linears of a :data:`FUSED_GROUPS` group on ``h``: fused when the layer holds them fused."""
    fused = layer.fused.get(group)
    if fused is not None:
        return fused(h, layer.cpu_codes.get(group))
    return [_linear(layer, n, h) for n in FUSED_GROUPS[group]]


def rope_at(inv_freq: Tensor, positions: Tensor, scaling: float) -> Rope:
    """Rotary tables for per-row positions ``(B, T)``, shaped ``(B, 1, T, d)`` to broadcast over heads."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    return Rope(cos=(emb.cos() * scaling)[:, None], sin=(emb.sin() * scaling)[:, None])


def _write_kv(x: Tensor, trans: Tensor | None, clip: Tensor, spec: QuantSpec, packed: bool,
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


def _read_kv(codes: Tensor, scale: Tensor, zero: Tensor, packed: bool, n: int, dtype: torch.dtype) -> Tensor:
    """The first ``n`` cached positions, dequantized: ``(B, Hkv, n, d)`` in ``dtype``."""
    if packed:
        return dequantize_kv_ref(codes[:, :, :n], scale[:, :, :n], zero[:, :, :n]).to(dtype)
    return codes[:, :, :n]


def attention_step(
    layer: RealLayer,
    h: Tensor,  # (B, T, hidden) normalised input
    rope: Rope,  # (B, 1, T, d)
    kv: LayerKV,
    cfg: RealConfig,
    idx: Tensor,  # (T,) int64 cache positions of these tokens
    start: Tensor,  # (B,) int32
    length: Tensor,  # (B,) int32 = seen + T
    *,
    n_valid: int,
    decode: bool,
    causal_from_zero: bool,
    k_packed: bool,
    v_packed: bool,
) -> Tensor:  # (B, T, H*d)
    """Q/K/V projections, RoPE, cache write, attention over the cache (positions ``< length``)."""
    a, qc = cfg.args, cfg.qcfg
    b, t, _ = h.shape
    q, k, v = _project(layer, "qkv", h)
    # RoPE and q's K^{-T} run on the (B, T, heads, d) layout the projections produce: one GEMM over all rows
    # for the transform (a (B, heads, T, d) view made cuBLAS run one small batched GEMM per row).
    rope_t = Rope(cos=rope.cos.transpose(1, 2), sin=rope.sin.transpose(1, 2))  # (B, T, 1, d)
    q, k = q.reshape(b, t, a.n_heads, a.head_dim), k.reshape(b, t, a.n_kv_heads, a.head_dim)
    if layer.q_norm is not None and layer.k_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
        q, k = rms_norm(q, layer.q_norm, a.rms_eps), rms_norm(k, layer.k_norm, a.rms_eps)
    q = apply_rope(q, rope_t)
    k = apply_rope(k, rope_t).transpose(1, 2)
    v = v.reshape(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
    if layer.k_trans_inv_t is not None:
        q = head_transform(q, layer.k_trans_inv_t)
    q = q.transpose(1, 2)
    if qc.q.enabled:
        q = fake_quant(q, qc.q, clip_lo=layer.q_clip[0], clip_hi=layer.q_clip[1])
    _write_kv(k, layer.k_trans, layer.k_clip, qc.k, k_packed, kv.k, kv.k_scale, kv.k_zero, idx)
    _write_kv(v, None, layer.v_clip, qc.v, v_packed, kv.v, kv.v_scale, kv.v_zero, idx)
    scale = 1.0 / math.sqrt(a.head_dim)
    if decode and k_packed and v_packed:
        o = kv4_decode_attention(q[:, :, 0], kv.k, kv.k_scale, kv.k_zero, kv.v, kv.v_scale, kv.v_zero, start,
                                 length, scale)
        return o.reshape(b, 1, a.q_dim)
    kk = _read_kv(kv.k, kv.k_scale, kv.k_zero, k_packed, n_valid, q.dtype)
    vv = _read_kv(kv.v, kv.v_scale, kv.v_zero, v_packed, n_valid, q.dtype)
    gqa = a.n_heads != a.n_kv_heads  # SDPA maps query heads to KV heads itself: the cache is never expanded
    if causal_from_zero:
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
    else:
        j = torch.arange(kk.shape[2], device=h.device)
        allowed = (j[None, None, :] >= start[:, None, None]) & (j[None, None, :] <= idx[None, :, None])
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed[:, None], enable_gqa=gqa)
    return o.transpose(1, 2).reshape(b, t, a.q_dim)


def layer_step(
    layer: RealLayer, x: Tensor, rope: Rope, kv: LayerKV, cfg: RealConfig, idx: Tensor, start: Tensor,
    length: Tensor, *, n_valid: int, decode: bool, causal_from_zero: bool, k_packed: bool, v_packed: bool,
) -> Tensor:  # (B, T, hidden) -> (B, T, hidden)
    """One decoder layer on new tokens ``x (B, T, hidden)``, writing their K/V into ``kv`` at ``idx``;
    attention covers cache positions ``< n_valid``."""
    eps = cfg.args.rms_eps
    h = rms_norm(x, layer.input_norm, eps)
    o = attention_step(layer, h, rope, kv, cfg, idx, start, length, n_valid=n_valid, decode=decode,
                       causal_from_zero=causal_from_zero, k_packed=k_packed, v_packed=v_packed)
    x = x + _linear(layer, "o_proj", o)
    h = rms_norm(x, layer.post_norm, eps)
    gate, up = _project(layer, "gate_up", h)
    m = F.silu(gate) * up
    return x + _linear(layer, "down_proj", m)


def decode_layer(layer: RealLayer, x: Tensor, rope: Rope, kv: LayerKV, cfg: RealConfig, idx: Tensor,
                 start: Tensor, length: Tensor) -> Tensor:  # (B, 1, hidden) -> (B, 1, hidden)
    """One decode step of one layer (the function to ``torch.compile``): packed K/V use
    ``kv4_decode_attention``, floating caches a masked SDPA over the preallocated positions."""
    return layer_step(layer, x, rope, kv, cfg, idx, start, length, n_valid=kv.k.shape[2], decode=True,
                      causal_from_zero=False, k_packed=kv.k.dtype == torch.uint8, v_packed=kv.v.dtype == torch.uint8)


class CompiledOrEager:
    """``torch.compile(fn, fullgraph=True)`` that falls back to ``fn`` for good, with one logged warning, once
    dynamo's recompile limit is hit (many models or shapes in one process), instead of failing the call."""

    def __init__(self, fn: Callable[..., Tensor], *, dynamic: bool | None = None) -> None:
        self.fn = fn
        self.compiled: Callable[..., Tensor] | None = torch.compile(fn, fullgraph=True, dynamic=dynamic)

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        """``fn(*args, **kwargs)``, compiled while dynamo allows."""
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                log.warning("%s: torch.compile recompile limit reached; running it uncompiled from now on "
                            "(raise torch._dynamo.config.cache_size_limit to keep it compiled)", self.fn.__name__)
                self.compiled = None
        return self.fn(*args, **kwargs)


class RealModel:
    """Inference over :class:`RealWeights`: prefill/decode with a :class:`KVCache`, logits out.

    Args:
        weights: the model tensors (on one device).
        compile_decode: wrap the per-layer decode step in ``torch.compile`` (fuses RoPE, norms, residuals and
            casts around the custom ops); None: on CUDA only.
        compile_prefill: the same for the prefill layer (shapes become dynamic after the second prompt shape);
            None: on CUDA only.
    """

    def __init__(self, weights: RealWeights, *, compile_decode: bool | None = None,
                 compile_prefill: bool | None = None) -> None:
        self.weights = weights
        self.cfg = weights.cfg
        cuda = weights.device.type == "cuda"
        self._decode_layer = CompiledOrEager(decode_layer, dynamic=False) \
            if (cuda if compile_decode is None else compile_decode) else decode_layer
        self._prefill_layer = CompiledOrEager(layer_step) \
            if (cuda if compile_prefill is None else compile_prefill) else layer_step

        self._static: dict[tuple[int, int], KVCache] = {}
        self._prefill_graphs: dict[tuple[int, int, int], CUDAGraphPrefill] = {}
        self._decoders: dict[int, CUDAGraphDecoder] = {}

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.weights.device

    def new_cache(self, batch: int, max_len: int, start: Tensor | None = None) -> KVCache:
        """An empty cache on the model's device (see :func:`new_cache`)."""
        return new_cache(self.cfg, batch, max_len, self.device, start)

    def static_cache(self, batch: int, max_len: int) -> KVCache:
        """The engine's reusable cache for ``(batch, max_len)``, emptied (like transformers' static cache: one per
        shape, so captured CUDA graphs stay valid; the next call with the same shape reuses and overwrites it)."""
        cache = self._static.get((batch, max_len))
        if cache is None:
            cache = self._static[(batch, max_len)] = self.new_cache(batch, max_len)
        cache.seen = 0
        return cache

    @torch.no_grad()
    def prefill_graphed(self, tokens: Tensor, cache: KVCache) -> Tensor:  # (B, T) -> (B, vocab)
        """Next-token logits of ``tokens`` written into the empty, unpadded ``cache``, replayed from a CUDA graph
        captured once per ``(B, T, cache)`` (removes the host time of launching every kernel of every layer)."""
        if cache.seen != 0 or cache.padded:
            raise ValueError("graphed prefill needs an empty cache without left padding")
        key = (tokens.shape[0], tokens.shape[1], cache.layers[0].k.data_ptr())
        graph = self._prefill_graphs.get(key)
        if graph is None:
            graph = self._prefill_graphs[key] = CUDAGraphPrefill(self, tokens.shape[0], tokens.shape[1], cache)
        return graph.run(tokens)

    def graphed_decoder(self, cache: KVCache) -> CUDAGraphDecoder:
        """The :class:`CUDAGraphDecoder` of ``cache``, captured on first use and kept for its later prefills."""
        key = cache.layers[0].k.data_ptr()
        dec = self._decoders.get(key)
        if dec is None or dec.cache is not cache:
            dec = self._decoders[key] = CUDAGraphDecoder(self, cache)
        return dec

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> Tensor:
        """Logits ``(B, T, vocab)`` of new ``tokens (B, T)``, appended to ``cache`` (a fresh one if None);
        ``(B, 1, vocab)`` of the last position only with ``last_only``.

        With a cache holding ``seen`` positions, the tokens take positions ``seen .. seen+T-1``; rows with left
        padding (``cache.start``) get RoPE positions counted from their first real token.
        """
        w, cfg = self.weights, self.cfg
        b, t = tokens.shape
        if cache is None:
            cache = self.new_cache(b, t)
        if cache.seen + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.seen} used, {t} more requested")
        dev = tokens.device
        idx = torch.arange(cache.seen, cache.seen + t, device=dev)
        pos = (idx[None, :] - cache.start[:, None].long()).clamp(min=0)
        rope = rope_at(w.top["rope.inv_freq"], pos, cfg.rope_scaling)
        length = torch.full((b,), cache.seen + t, dtype=torch.int32, device=dev)
        decode = t == 1 and cache.seen > 0
        causal0 = cache.seen == 0 and not cache.padded
        x = F.embedding(tokens, w.top["embed"]).to(cfg.dtype)
        for layer, kv in zip(w.layers, cache.layers, strict=True):
            if decode:
                x = self._decode_layer(layer, x, rope, kv, cfg, idx, cache.start, length)
            else:
                x = self._prefill_layer(layer, x, rope, kv, cfg, idx, cache.start, length, n_valid=cache.seen + t,
                                        decode=False, causal_from_zero=causal0, k_packed=cache.k_packed,
                                        v_packed=cache.v_packed)
        cache.seen += t
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, w.top["final_norm"].to(cfg.dtype), cfg.args.rms_eps)
        return F.linear(x, w.top["lm_head"].to(cfg.dtype))

    __call__ = forward

    def decode_step(self, tok: Tensor, pos: Tensor, cache: KVCache) -> Tensor:  # (B, 1), (1,) -> (B, vocab)
        """One decode step with the position as a device tensor: no host synchronisation and no Python state
        read from the cache, so it can be captured in a CUDA graph (:class:`CUDAGraphDecoder`). The caller
        advances ``cache.seen``."""
        w, cfg = self.weights, self.cfg
        b = tok.shape[0]
        positions = (pos[None, :] - cache.start[:, None].long()).clamp(min=0)
        rope = rope_at(w.top["rope.inv_freq"], positions, cfg.rope_scaling)
        length = (pos + 1).to(torch.int32).expand(b)
        x = F.embedding(tok, w.top["embed"]).to(cfg.dtype)
        for layer, kv in zip(w.layers, cache.layers, strict=True):
            x = self._decode_layer(layer, x, rope, kv, cfg, pos, cache.start, length)
        x = rms_norm(x, w.top["final_norm"].to(cfg.dtype), cfg.args.rms_eps)
        return F.linear(x, w.top["lm_head"].to(cfg.dtype))[:, -1]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield new tokens ``(B,)`` one step at a time (greedy at ``temperature == 0``, else top-p sampling).

        Args:
            prompt: ``(B, T)`` token ids (no padding).
        """
        b, t = prompt.shape
        cache = self.new_cache(b, t + max_new_tokens)
        logits = self.forward(prompt, cache, last_only=True)[:, -1]
        # On CUDA every decode step is one CUDA-graph replay (captured after the prefill, before the first token).
        graph = CUDAGraphDecoder(self, cache) if self.device.type == "cuda" and max_new_tokens > 1 else None
        done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator)
            yield nxt
            if eos_token_id is not None:
                done |= nxt == eos_token_id
                if bool(done.all()):
                    return
            logits = graph.step(nxt) if graph is not None else self.forward(nxt[:, None], cache)[:, -1]


class CUDAGraphPrefill:
    """A prefill of ``(batch, length)`` tokens into one empty cache, replayed from a CUDA graph.

    Two warm-up runs on a side stream compile and autotune every kernel; the capture then records the whole
    forward (all layers, the final norm and the last position's logits). Each :meth:`run` copies the tokens into
    the static buffer, replays, and marks the cache as holding ``length`` positions.
    """

    def __init__(self, model: RealModel, batch: int, length: int, cache: KVCache) -> None:
        dev = model.device
        self.cache, self.length = cache, length
        self.tok = torch.zeros(batch, length, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                cache.seen = 0
                model.forward(self.tok, cache, last_only=True)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        cache.seen = 0
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = model.forward(self.tok, cache, last_only=True)[:, -1]
        cache.seen = 0

    def run(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, vocab), valid until the next run
        """Prefill ``tokens`` and return the last position's logits."""
        self.tok.copy_(tokens)
        self.graph.replay()
        self.cache.seen = self.length
        return self.out


class CUDAGraphDecoder:
    """Decode steps of a :class:`RealModel` replayed from one CUDA graph (removes per-op launch overhead).

    Captures :meth:`RealModel.decode_step` on static token/position buffers for one cache (its tensors stay in
    place); the warm-up before capture compiles/autotunes the kernels and writes a throw-away K/V at position
    ``cache.seen``, which the first real step overwrites before reading it.
    """

    def __init__(self, model: RealModel, cache: KVCache) -> None:
        dev = model.device
        self.model, self.cache = model, cache
        self.tok = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.seen, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                model.decode_step(self.tok, self.pos, cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = model.decode_step(self.tok, self.pos, cache)

    def step(self, tok: Tensor) -> Tensor:  # (B,) -> (B, vocab), valid until the next step
        """Append ``tok`` at the next position and return the next-token logits."""
        if self.cache.seen >= self.cache.max_len:
            raise ValueError("KV cache is full")
        self.tok.copy_(tok[:, None])
        self.pos.fill_(self.cache.seen)
        self.graph.replay()
        self.cache.seen += 1
        return self.out


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens ``(B,)`` from ``logits (B, vocab)``: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def window_nlls(model: RealModel, windows: Tensor, *, batch_size: int = 1) -> Tensor:  # (N, T) -> (N,)
    """Mean next-token cross-entropy of each window on the real path (one prefill per batch, KV4 included)."""
    out = []
    for s in range(0, windows.shape[0], batch_size):
        tok = windows[s:s + batch_size].to(model.device)
        logits = model.forward(tok).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                               reduction="none").view(tok.shape[0], -1).mean(1)
        out.append(loss.cpu())
    return torch.cat(out)
