"""Where FlatQuant's transforms sit in a decoder layer (spec §2.4) and how they fold into weights (§3.7).

A layer's *flat* parameters (transform factors, diag scales, LWC/LAC logits) are a flat dict:

* ``{site}.left.*``, ``{site}.right.*`` for the Kronecker sites ``ln_trans`` (hidden),
  ``up_gate_trans`` (hidden) and ``down_trans`` (intermediate); ``{site}.diag`` for their scales;
* ``o_trans.*`` (heads × heads), ``v_trans.*`` and ``k_trans.*`` (head_dim × head_dim);
* ``{linear}.lwc.lo|hi`` (out, 1); ``{linear}.lac.lo|hi``, ``k_cache|v_cache|q_quant.lac.lo|hi`` (1,).

:func:`fold_layer` maps them together with the frozen layer weights to the folded layer dict
that :func:`flatquant.models.layer.layer_forward` runs. Training runs exactly that forward on the
fold, so the calibrated function and the deployed (merged) function are the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..core.affine import cayley, init_factor, materialize_factor, smooth_scale
from ..core.clip import clip_weight
from ..core.kron import decompose_dim, kron_transform
from ..core.quant import fake_quant
from ..core.recompute import recompute_in_backward
from ..core.spec import QuantConfig, QuantSpec, TransformConfig
from .args import LAYER_TENSORS, LINEARS, ModelArgs
from .sites import KRON_SITES, SITES

Params = dict[str, Tensor]

SITE_CONSUMERS = {s.transform: s.linears for s in SITES if s.kron}
TRAINABLE_KINDS = ("svd", "inv")


def site_dim(site: str, args: ModelArgs) -> int:
    """Width of the activation at a Kronecker site."""
    return args.intermediate if site == "down_trans" else args.hidden


def has_layer_transforms(qcfg: QuantConfig, tcfg: TransformConfig) -> bool:
    """Kronecker, o and v transforms exist when weights or activations are quantized."""
    return tcfg.has_kron and (qcfg.w.enabled or qcfg.a.enabled)


def is_lac_key(key: str) -> bool:
    """True for activation-clip (LAC) logits, ``{quantizer}.lac.lo|hi``."""
    return key.split(".")[-2:-1] == ["lac"]


def is_clip_key(key: str) -> bool:
    """True for LWC/LAC logits (they get the larger learning rate)."""
    parts = key.split(".")
    return "lwc" in parts or "lac" in parts


def init_flat_params(
    frozen: Params,
    args: ModelArgs,
    qcfg: QuantConfig,
    tcfg: TransformConfig,
    *,
    absmax: dict[str, Tensor] | None,
    generator: torch.Generator,
) -> tuple[Params, Params]:
    """Initial ``(trainable, fixed)`` flat parameters of one layer.

    Args:
        frozen: the layer's original weights (used for the diag init's per-column weight maxima).
        absmax: per-channel max |x| at each Kronecker site from the FP pass (needed for the
            ``smoothquant`` diag init).
        generator: source of the random orthogonal initial factors.
    """
    trainable: Params = {}
    fixed: Params = {}
    kinds_train = tcfg.trainable and tcfg.kind in TRAINABLE_KINDS
    dest = trainable if kinds_train else fixed
    if has_layer_transforms(qcfg, tcfg):
        for site in KRON_SITES:
            n1, n2 = decompose_dim(site_dim(site, args))
            for side, n in (("left", n1), ("right", n2)):
                for k, v in init_factor(tcfg.kind, n, generator=generator).items():
                    dest[f"{site}.{side}.{k}"] = v
        for site, n in (("o_trans", args.n_heads), ("v_trans", args.head_dim)):
            for k, v in init_factor(tcfg.kind, n, generator=generator).items():
                dest[f"{site}.{k}"] = v
    if tcfg.has_kron and (qcfg.k.enabled or qcfg.q.enabled):
        for k, v in init_factor(tcfg.kind, args.head_dim, generator=generator).items():
            dest[f"k_trans.{k}"] = v
    if tcfg.add_diag and (qcfg.w.enabled or qcfg.a.enabled):
        diag_dest = trainable if tcfg.trainable else fixed
        for site in KRON_SITES:
            if tcfg.diag_init == "smoothquant":
                if absmax is None:
                    raise ValueError("the smoothquant diag init needs activation statistics (absmax)")
                wmax = torch.cat([frozen[f"{n}.weight"] for n in SITE_CONSUMERS[site]], 0).abs().amax(0).float()
                diag_dest[f"{site}.diag"] = smooth_scale(absmax[site].float(), wmax, tcfg.diag_alpha)
            else:
                diag_dest[f"{site}.diag"] = torch.ones(site_dim(site, args))
    shapes = args.linear_shapes
    if tcfg.lwc and qcfg.w.enabled:
        for n in LINEARS:
            trainable[f"{n}.lwc.lo"] = torch.full((shapes[n][0], 1), tcfg.clip_init)
            trainable[f"{n}.lwc.hi"] = torch.full((shapes[n][0], 1), tcfg.clip_init)
    if tcfg.lac:
        names = [n for n in LINEARS if qcfg.a.enabled]
        names += [n for n, s in (("q_quant", qcfg.q), ("k_cache", qcfg.k), ("v_cache", qcfg.v)) if s.enabled]
        for n in names:
            trainable[f"{n}.lac.lo"] = torch.full((1,), tcfg.clip_init)
            trainable[f"{n}.lac.hi"] = torch.full((1,), tcfg.clip_init)
    return trainable, fixed


def _factor_names(flat: Params) -> list[str]:
    """Prefixes of the factors present (``ln_trans.left``, ..., ``o_trans``, ``v_trans``, ``k_trans``)."""
    cands = [f"{site}.{side}" for site in KRON_SITES for side in ("left", "right")] + ["o_trans", "v_trans", "k_trans"]
    return [c for c in cands if f"{c}.u" in flat or f"{c}.m" in flat]


def materialize(flat: Params, kind: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``factor -> (P, P^{-T})`` for every factor present (``ln_trans.left``, ``o_trans``, ...).

    For the ``svd`` kind the Cayley maps of all factors of one size run as one batched solve,
    which keeps the number of kernel launches per calibration step low.
    """
    names = _factor_names(flat)
    if kind != "svd":
        return {n: materialize_factor(kind, {k: flat[f"{n}.{k}"] for k in ("m",)}) for n in names}
    by_size: dict[int, list[str]] = {}
    for n in names:
        by_size.setdefault(flat[f"{n}.u"].shape[-1], []).append(n)
    out = {}
    for group in by_size.values():
        orth = cayley(torch.stack([flat[f"{n}.{k}"] for n in group for k in ("u", "v")]))
        sig = torch.stack([flat[f"{n}.sigma"] for n in group]).unsqueeze(1)  # (G, 1, n)
        u, v = orth[0::2], orth[1::2]
        p, p_inv_t = (u * sig) @ v.mT, (u / sig) @ v.mT
        for i, n in enumerate(group):
            out[n] = (p[i], p_inv_t[i])
    return out


def _weight_chain(present: tuple[str, ...], args: ModelArgs, wspec: QuantSpec | None) -> Callable[..., Tensor]:
    """The per-linear weight fold as a pure function of ``(W, *tensors named by present)``."""

    def chain(w: Tensor, *ts: Tensor) -> Tensor:  # (out, in) -> (out, in)
        t = dict(zip(present, ts, strict=True))
        if "diag" in t:
            w = w / t["diag"]
        if "left" in t:
            w = kron_transform(w, t["left"], t["right"])
        if "lwc_lo" in t:
            w = clip_weight(w, t["lwc_lo"], t["lwc_hi"])
        if "vmix" in t:
            w = (t["vmix"].mT @ w.reshape(args.n_kv_heads, args.head_dim, -1)).reshape(w.shape)
        if "row_scale" in t:
            w = w * t["row_scale"].unsqueeze(1)
        return w if wspec is None else fake_quant(w, wspec)

    return chain


def fold_layer(
    flat: Params,
    frozen: Params,
    args: ModelArgs,
    qcfg: QuantConfig,
    kind: str,
    *,
    quantize_weights: bool = True,
    recompute: bool = False,
) -> Params:
    """Merge transforms, diag scales and LWC into the weights; return the folded layer dict.

    Per linear: ``W ⊘ s`` → ``W P^{-T}`` (Kronecker) → LWC clamp → (v_proj: ``V^T W_h`` per head;
    up_proj: rows × the down diag) → fake weight quantization (unless ``quantize_weights=False``,
    e.g. before GPTQ). Online matrices (P, not P^{-T}) and LAC logits are carried over.
    Computation happens in the dtype of ``frozen`` (use float64 for the final reparameterisation).
    ``recompute`` (training): each weight's chain is recomputed in backward instead of keeping its
    weight-sized intermediates alive (same gradients, several weight copies less memory).
    """
    mats = materialize(flat, kind)
    dt = frozen["input_norm"].dtype
    out: Params = {}
    diag = {site: flat[f"{site}.diag"].to(dt) for site in KRON_SITES if f"{site}.diag" in flat}
    out["input_norm"] = frozen["input_norm"] * diag["ln_trans"] if "ln_trans" in diag else frozen["input_norm"]
    out["post_norm"] = (frozen["post_norm"] * diag["up_gate_trans"]
                        if "up_gate_trans" in diag else frozen["post_norm"])
    out.update({e.name: frozen[e.name] for e in LAYER_TENSORS if e.name in frozen})  # outside every site: unchanged
    site_of = {n: s for s, ns in SITE_CONSUMERS.items() for n in ns}
    v_mat = mats.get("v_trans")
    for n in LINEARS:
        bias = frozen.get(f"{n}.bias")
        site = site_of.get(n)
        t: Params = {}
        if site is not None:
            if site in diag:
                t["diag"] = diag[site]
            if f"{site}.left" in mats:
                t["left"], t["right"] = mats[f"{site}.left"][1].to(dt), mats[f"{site}.right"][1].to(dt)
        elif n == "o_proj" and "o_trans" in mats and v_mat is not None:
            t["left"], t["right"] = mats["o_trans"][1].to(dt), v_mat[1].to(dt)
        if f"{n}.lwc.lo" in flat:
            t["lwc_lo"], t["lwc_hi"] = flat[f"{n}.lwc.lo"], flat[f"{n}.lwc.hi"]
        if n == "v_proj" and v_mat is not None:
            t["vmix"] = v_mat[0].to(dt)
            if bias is not None:
                bias = (bias.reshape(args.n_kv_heads, args.head_dim) @ t["vmix"]).reshape(bias.shape)
        if n == "up_proj" and "down_trans" in diag:
            t["row_scale"] = diag["down_trans"]
            if bias is not None:
                bias = bias * diag["down_trans"]
        chain = _weight_chain(tuple(t), args, qcfg.w if quantize_weights else None)
        w = frozen[f"{n}.weight"]
        out[f"{n}.weight"] = recompute_in_backward(chain, w, *t.values()) if recompute else chain(w, *t.values())
        if bias is not None:
            out[f"{n}.bias"] = bias
    for site in KRON_SITES:
        if f"{site}.left" in mats:
            out[f"{site}.left"] = mats[f"{site}.left"][0].to(dt)
            out[f"{site}.right"] = mats[f"{site}.right"][0].to(dt)
    if "o_trans" in mats:
        out["o_trans"] = mats["o_trans"][0].to(dt)
    if "k_trans" in mats:
        out["k_trans"], out["k_trans_inv_t"] = (m.to(dt) for m in mats["k_trans"])
    out.update({k: v for k, v in flat.items() if is_lac_key(k)})
    return out


def cast_folded(p: Params, dtype: torch.dtype, device: torch.device | str | None = None) -> Params:
    """A folded layer dict in the model's dtype; the LAC clip logits stay fp32."""
    return {k: v.to(device=device, dtype=torch.float32 if is_lac_key(k) else dtype)
            for k, v in p.items()}
