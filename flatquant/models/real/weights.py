"""A real model's tensors: per-layer :class:`RealLayer` built from the checkpoint schema, :class:`RealWeights`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ...ops import reference as ref
from ...ops.qlinear import QLinearParams
from ..args import LAYER_TENSORS, LINEARS
from ..sites import FUSED_GROUPS, SITE_OF_LINEAR
from .config import RealConfig
from .linear import FakeLinear, FusedQLinear, Linear, fuse_linears, gemv_counters

Params = dict[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class RealLayer:
    """One decoder layer's inference tensors."""

    input_norm: Tensor  # (hidden,)
    post_norm: Tensor  # (hidden,)
    linears: dict[str, Linear]  # the linears that run on their own (not in ``fused``)
    fused: dict[str, FusedQLinear]  # FUSED_GROUPS name -> fused linears (W4A4 only; empty otherwise)
    cpu_codes: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # linear or group -> (N, K) int8 codes
    # linear or group -> int32 arrival counters of its decode GEMV (CUDA, W4A4; see linear.gemv_counters)
    gemv_counters: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    k_trans: Tensor | None  # (d, d)
    k_trans_inv_t: Tensor | None  # (d, d)
    q_clip: Tensor  # (2,) fp32
    k_clip: Tensor  # (2,) fp32
    v_clip: Tensor  # (2,) fp32
    extra: Params = dataclasses.field(default_factory=dict)  # the family's layer tensors (args.LAYER_TENSORS) by name


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
        # contiguous: the kernels take row-major factors, and a strided one (e.g. torch.linalg.qr's column-major Q)
        # would be copied on every call (8 extra kernels per decode step and layer, measured on the H200)
        return t[k].to(dt).contiguous() if k in t else None

    linears: dict[str, Linear] = {}
    factors: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    for n in LINEARS:
        site = SITE_OF_LINEAR[n]
        if site.transform not in factors:  # one tensor per site, so linears of a site share (and can fuse) it
            factors[site.transform] = ((fl(f"{site.transform}.left"), fl(f"{site.transform}.right")) if site.kron
                                       else (fl(site.transform), None))
        left, right = factors[site.transform]
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
                for n in group:  # the fused copy replaces the separate linears (no second copy in memory)
                    del linears[n]
    # the W4A4 GEMMs (a linear on its own or a fused group) by name: their packed (N, K/2) weights
    w4a4 = {**{n: p.weight for n, p in linears.items() if isinstance(p, QLinearParams) and p.a_bits == 4
               and p.w_bits == 4},
            **{g: f.weight for g, f in fused.items()}}
    cpu_codes: dict[str, Tensor] = {}
    if cfg.real_linears and cfg.cpu_codes and dev.type == "cpu":
        cpu_codes = {n: ref.unpack_int4_ref(w) for n, w in w4a4.items()}
    counters = {n: c for n, w in w4a4.items() if (c := gemv_counters(w.shape[0], dev)) is not None}
    return RealLayer(
        input_norm=t["input_norm"].to(dt), post_norm=t["post_norm"].to(dt), linears=linears, fused=fused,
        cpu_codes=cpu_codes, gemv_counters=counters,
        k_trans=fl("k_trans"), k_trans_inv_t=fl("k_trans_inv_t"),
        q_clip=t.get("q_quant.clip", _ones_clip(dev)).float(), k_clip=t.get("k_cache.clip", _ones_clip(dev)).float(),
        v_clip=t.get("v_cache.clip", _ones_clip(dev)).float(),
        extra={e.name: t[e.name].to(dt).contiguous() for e in LAYER_TENSORS if e.name in t})
