"""One decoder layer of the real engine (prefill and decode): the shared skeleton
(:func:`flatquant.models.layer.decoder_layer`) with the engine's linears and attention (projections, RoPE, cache
write, SDPA or the KV4 decode kernel)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.kron import head_transform
from ...core.norm import rms_norm
from ...core.quant import fake_quant
from ...ops.kv_attention import kv4_decode_attention
from ..layer import Rope, apply_rope, decoder_layer, qk_pre_rope, rms_norm_fn, swiglu
from ..sites import FUSED_GROUPS
from .cache import LayerKV, read_kv, write_kv, write_kv_packed
from .config import RealConfig
from .linear import FakeLinear, real_linear
from .weights import RealLayer

DECODE_FUSIONS = ("norm", "residual", "q_trans")
"""The decode-step fusions: RMSNorm in the q/k/v and gate/up transform kernel (``norm``), the residual adds in the
o/down GEMV epilogues (``residual``), q's K^-T in the attention kernel (``q_trans``)."""

DEFAULT_DECODE_FUSIONS = ("norm", "residual")
"""Measured on the H200 (LLaMA-3-8B shape, ``bench/results/engine_fusions_h200.json``, one process per setting in
one call): none 3.161 / 4.771 ms per decode step at batch 1 / 16, norm + residual 2.985 / 4.630, q_trans alone
3.645 / 6.016 (slower: every attention program now loads the (d, d) matrix and runs two extra products before its
first cache tile), so q_trans is off by default."""

PREFILL_FUSIONS = ("norm", "residual")
"""The prefill fusions: the same RMSNorm in the transform kernel, and the residual adds in the o/down GEMM
epilogues (the W8A8 kernel's from ``UNPACK_MIN_M`` tokens)."""

DEFAULT_PREFILL_FUSIONS: tuple[str, ...] = ()
"""Measured on the H200 (``bench/results/engine_prefill_fusions_h200.json``, one process per setting, alternated
twice in one call): 2048-token prefill 42.0 / 42.1 ms without, 42.5 / 42.4 with norm + residual (batch 16: 597.2 /
595.6 against 598.7 / 597.4): the kernels they remove are a small share of a prefill and the norm lengthens the
transform kernel's per-token chain, so both stay off at prefill."""


def _fusions(env_name: str, allowed: tuple[str, ...], default: tuple[str, ...]) -> frozenset[str]:
    env = os.environ.get(env_name)
    if env is None:
        return frozenset(default)
    chosen = frozenset(f.strip() for f in env.split(",") if f.strip() and f.strip() != "none")
    if not chosen <= set(allowed):
        raise ValueError(f"{env_name} must name some of {allowed} or 'none', got {env!r}")
    return chosen


def decode_fusions() -> frozenset[str]:
    """The decode-step fusions in use (:data:`DECODE_FUSIONS`): :data:`DEFAULT_DECODE_FUSIONS`, unless
    ``FLATQUANT_DECODE_FUSIONS`` (comma-separated, ``none`` for none) names others, for side-by-side measurements.
    Read when a decode step is traced (set it before a model compiles its decode step)."""
    return _fusions("FLATQUANT_DECODE_FUSIONS", DECODE_FUSIONS, DEFAULT_DECODE_FUSIONS)


def prefill_fusions() -> frozenset[str]:
    """The prefill fusions in use (:data:`PREFILL_FUSIONS`): :data:`DEFAULT_PREFILL_FUSIONS`, unless
    ``FLATQUANT_PREFILL_FUSIONS`` names others (as :func:`decode_fusions`; read when a prefill layer is traced)."""
    return _fusions("FLATQUANT_PREFILL_FUSIONS", PREFILL_FUSIONS, DEFAULT_PREFILL_FUSIONS)


@dataclass(frozen=True)
class Normed:
    """A layer's RMSNorm of ``x`` (B, T, hidden) with ``weight``, not yet applied: the fused q/k/v and
    gate/up transform kernel applies it as it loads the token (``flatquant::kron_quant_multi``'s ``norm``), so the
    normalised input is never written out; any other consumer calls :meth:`value`."""

    x: Tensor
    weight: Tensor
    eps: float

    def value(self) -> Tensor:  # (B, T, hidden)
        """The normalised input."""
        return rms_norm(self.x, self.weight, self.eps)


def _linear(layer: RealLayer, name: str, x: Tensor, up: Tensor | None = None,
            residual: Tensor | None = None) -> Tensor:  # (B, T, K) -> (B, T, N)
    """Linear ``name`` of the layer on ``x``; with ``up``, on ``swiglu(x, up)`` (formed in the transform kernel);
    with ``residual`` (B, T, N), ``residual +`` it (in the GEMV's epilogue at decode)."""
    lin = layer.linears[name]
    if isinstance(lin, FakeLinear):
        y = lin(x if up is None else swiglu(x, up))
        return y if residual is None else residual + y
    return real_linear(x, lin, layer.cpu_codes.get(name), layer.gemv_counters.get(name), up, residual)


def _project(layer: RealLayer, group: str, h: Tensor | Normed) -> list[Tensor]:  # (B, T, K) -> G x (B, T, N_g)
    """The linears of a :data:`FUSED_GROUPS` group on ``h``: fused when the layer holds them fused (a deferred
    norm then runs in their transform kernel)."""
    fused = layer.fused.get(group)
    if fused is not None:
        if isinstance(h, Normed):
            return fused(h.x, layer.cpu_codes.get(group), layer.gemv_counters.get(group), h.weight, h.eps)
        return fused(h, layer.cpu_codes.get(group), layer.gemv_counters.get(group))
    h = h.value() if isinstance(h, Normed) else h
    return [_linear(layer, n, h) for n in FUSED_GROUPS[group]]


def rope_at(inv_freq: Tensor, positions: Tensor, scaling: float) -> Rope:
    """Rotary tables for per-row positions ``(B, T)``, shaped ``(B, T, 1, d)`` to broadcast over the heads of the
    ``(B, T, heads, d)`` projections."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    emb = torch.cat([freqs, freqs], dim=-1)
    return Rope(cos=(emb.cos() * scaling)[:, :, None], sin=(emb.sin() * scaling)[:, :, None])


def attention_step(
    layer: RealLayer,
    h: Tensor | Normed,  # (B, T, hidden) normalised input
    rope: Rope,  # (B, T, 1, d)
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
    q, k, v = _project(layer, "qkv", h)
    b, t, _ = q.shape
    # RoPE and q's K^{-T} run on the (B, T, heads, d) layout the projections produce: one GEMM over all rows
    # for the transform (a (B, heads, T, d) view made cuBLAS run one small batched GEMM per row).
    q, k = q.reshape(b, t, a.n_heads, a.head_dim), k.reshape(b, t, a.n_kv_heads, a.head_dim)
    q, k = qk_pre_rope(q, k, layer.extra, a)  # the family's q/k math, shared with the fake attention
    q = apply_rope(q, rope)
    k = apply_rope(k, rope).transpose(1, 2)
    v = v.reshape(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
    kernel_attention = decode and k_packed and v_packed
    # q's K^{-T}: inside the decode attention kernel when nothing needs the transformed q before it
    q_trans = (layer.k_trans_inv_t if kernel_attention and not qc.q.enabled and "q_trans" in decode_fusions()
               else None)
    if layer.k_trans_inv_t is not None and q_trans is None:
        q = head_transform(q, layer.k_trans_inv_t)
    q = q.transpose(1, 2)
    if qc.q.enabled:
        q = fake_quant(q, qc.q, clip_lo=layer.q_clip[0], clip_hi=layer.q_clip[1])
    if k_packed and v_packed:  # one fused quantize + write for both sides, from the (B, T, Hkv, d) views
        write_kv_packed(k.transpose(1, 2), v.transpose(1, 2), layer.k_trans, layer.k_clip, layer.v_clip, qc.k.bits,
                        qc.v.bits, kv, idx)
    else:
        write_kv(k, layer.k_trans, layer.k_clip, qc.k, k_packed, kv.k, kv.k_scale, kv.k_zero, idx)
        write_kv(v, None, layer.v_clip, qc.v, v_packed, kv.v, kv.v_scale, kv.v_zero, idx)
    scale = 1.0 / math.sqrt(a.head_dim)
    if kernel_attention:
        o = kv4_decode_attention(q[:, :, 0], kv.k, kv.k_scale, kv.k_zero, kv.v, kv.v_scale, kv.v_zero, start,
                                 length, scale, q_trans)
        return o.reshape(b, 1, a.q_dim)
    kk = read_kv(kv.k, kv.k_scale, kv.k_zero, k_packed, n_valid, q.dtype)
    vv = read_kv(kv.v, kv.v_scale, kv.v_zero, v_packed, n_valid, q.dtype)
    # SDPA maps query heads to KV heads itself: the cache is never expanded. A Python branch, not a value: once
    # dynamo has compiled this for models of several head counts in one process it traces them as SymInts, and SDPA
    # refuses a SymBool enable_gqa (bool() does not specialise it); the branch guards on it instead.
    gqa = True if a.n_heads != a.n_kv_heads else False  # noqa: SIM210
    if causal_from_zero:
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
    else:
        j = torch.arange(kk.shape[2], device=q.device)
        allowed = (j[None, None, :] >= start[:, None, None]) & (j[None, None, :] <= idx[None, :, None])
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed[:, None], enable_gqa=gqa)
    return o.transpose(1, 2).reshape(b, t, a.q_dim)


def layer_step(
    layer: RealLayer, x: Tensor, rope: Rope, kv: LayerKV, cfg: RealConfig, idx: Tensor, start: Tensor,
    length: Tensor, *, n_valid: int, decode: bool, causal_from_zero: bool, k_packed: bool, v_packed: bool,
) -> Tensor:  # (B, T, hidden) -> (B, T, hidden)
    """One decoder layer (:func:`~flatquant.models.layer.decoder_layer`, the fake forward's skeleton) on new tokens
    ``x (B, T, hidden)``, with the engine's linears (fused where the layer holds them fused) and
    :func:`attention_step`, which writes their K/V into ``kv`` at ``idx``; attention covers cache positions
    ``< n_valid``. With the fusions (:func:`decode_fusions`, :func:`prefill_fusions`) the two norms are deferred
    into the fused q/k/v and gate/up transform kernels (:class:`Normed`) and the residual adds run in the o/down
    GEMMs' epilogues."""

    def attend(h: Tensor | Normed) -> Tensor:  # (B, T, hidden) -> (B, T, H*d)
        return attention_step(layer, h, rope, kv, cfg, idx, start, length, n_valid=n_valid, decode=decode,
                              causal_from_zero=causal_from_zero, k_packed=k_packed, v_packed=v_packed)

    def gate_up(h: Tensor | Normed) -> tuple[Tensor, Tensor]:  # (B, T, hidden) -> 2 x (B, T, intermediate)
        gate, up = _project(layer, "up_gate", h)
        return gate, up

    fusions = decode_fusions() if decode else prefill_fusions()
    eps = cfg.args.rms_eps
    norm = (lambda v, w: Normed(v, w, eps)) if "norm" in fusions else rms_norm_fn(eps)

    def o_proj(o: Tensor, res: Tensor) -> Tensor:  # (B, T, H*d), residual (B, T, hidden) -> (B, T, hidden)
        if "residual" in fusions:
            return _linear(layer, "o_proj", o, residual=res)
        return res + _linear(layer, "o_proj", o)

    def down(gate: Tensor, up: Tensor, res: Tensor) -> Tensor:  # 2 x (B, T, intermediate), residual -> hidden
        if "residual" in fusions:
            return _linear(layer, "down_proj", gate, up, res)
        return res + _linear(layer, "down_proj", gate, up)

    return decoder_layer(x, input_norm=layer.input_norm, post_norm=layer.post_norm, norm=norm, attention=attend,
                         o_proj=o_proj, gate_up=gate_up, down=down)


def decode_layer(layer: RealLayer, x: Tensor, rope: Rope, kv: LayerKV, cfg: RealConfig, idx: Tensor,
                 start: Tensor, length: Tensor) -> Tensor:  # (B, 1, hidden) -> (B, 1, hidden)
    """One decode step of one layer (the function to ``torch.compile``): packed K/V use
    ``kv4_decode_attention``, floating caches a masked SDPA over the preallocated positions."""
    return layer_step(layer, x, rope, kv, cfg, idx, start, length, n_valid=kv.k.shape[2], decode=True,
                      causal_from_zero=False, k_packed=kv.k.dtype == torch.uint8, v_packed=kv.v.dtype == torch.uint8)
