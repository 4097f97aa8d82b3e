"""Flatness figures in the style of the FlatQuant paper (Figures 1 and 2), written as PNG files.

* :func:`flatness_figure` (Fig. 1): per input channel, the max ``|.|`` of a weight matrix and of the
  activation that feeds it, sorted in descending order, for each method (original / SmoothQuant-style /
  QuaRot-style Hadamard / FlatQuant). Flat curves are easy to quantize; a steep head means outlier
  channels that set the quantization scale.
* :func:`mse_figure` (Fig. 2): per layer, the MSE of the fake-quantized layer's output against the FP
  layer (every layer fed the FP model's hidden states, as in calibration), the relative quantization
  error of the linears' inputs, and the output MSE per token position.

What is measured is what the deployed model computes: every method's layer is folded with
:func:`flatquant.models.flat.fold_layer` (diag scales into the norms, ``P^{-T}`` and LWC into the
weights) and run through :func:`flatquant.models.layer.layer_forward`, whose online Kronecker /
head-mixing transforms produce the inputs of the linears; those inputs are recorded through the
forward's ``linear_fn`` hook. Weights are the folded ``{linear}.weight`` with ``quantize_weights=False``.

matplotlib is imported lazily inside the drawing functions (object-oriented API, Agg canvas; no
global backend switch), so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..calib.config import CalibConfig
from ..calib.loop import calibrate
from ..calib.methods import METHODS
from ..core.spec import QuantConfig, TransformConfig
from ..models.flat import fold_layer
from ..models.layer import Rope, layer_forward, linear, quant_act
from ..models.model import ModelWeights, embed, rope_for
from ..models.sites import SITES as SITE_MAP

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
Reduce = Literal["max", "l2"]

SITES: dict[str, tuple[str, ...]] = {s.key: s.linears for s in SITE_MAP}
"""Activation sites: the linears that share one input (the first one's input is the site's activation)."""

SITE_TITLES = {"qkv": "q/k/v input (after input norm)", "o_proj": "o_proj input (attention output)",
               "up_gate": "up/gate input (after post-attn norm)", "down": "down_proj input"}
METHOD_STYLE = {"original": ("tab:gray", "-"), "rtn": ("tab:gray", "-"), "smoothquant": ("tab:orange", "--"),
                "quarot": ("tab:blue", "-."), "flatquant": ("tab:red", "-")}
METHOD_LABEL = {"original": "original", "rtn": "original (RTN)", "smoothquant": "SmoothQuant-style",
                "quarot": "Hadamard (QuaRot-style)", "flatquant": "FlatQuant"}


def channel_magnitudes(
    t: Tensor,  # (..., n) activations, or (out, n) weights: channels are the last dimension
    *,
    reduce: Reduce = "max",
) -> Tensor:  # (n,) sorted descending
    """Per-channel magnitude over everything but the last dimension, sorted in descending order.

    Args:
        t: a tensor whose last dimension indexes input channels (an activation ``(..., n)`` or a
            weight ``(out, n)``).
        reduce: ``max`` (max ``|.|``, what sets a quantization scale) or ``l2`` (Frobenius norm,
            the paper's Figure 1 measure).

    Returns:
        A float32 CPU vector of length ``n``.
    """
    flat = t.detach().reshape(-1, t.shape[-1]).float()
    mag = flat.abs().amax(0) if reduce == "max" else flat.norm(dim=0)
    return mag.sort(descending=True).values.cpu()


def flatness_ratio(mags: Tensor) -> float:  # mags: (n,)
    """``max / mean`` of channel magnitudes: 1 for perfectly flat channels, large with outliers."""
    return float(mags.max() / mags.mean().clamp_min(1e-30))


def fp_layer_inputs(
    weights: ModelWeights,
    tokens: Tensor,  # (N, T) int64
    *,
    device: torch.device | str = "cpu",
    upto: int | None = None,
) -> Iterator[tuple[int, Tensor, Rope]]:  # yields (layer, x (N, T, hidden) fp32, rope)
    """The FP model's hidden state entering each layer ``0 .. upto`` (default: all), one at a time.

    Only one layer's weights are moved to ``device`` at a time.
    """
    device = torch.device(device)
    last = weights.args.n_layers - 1 if upto is None else upto
    rope = rope_for(weights, tokens.shape[1], device)
    with torch.no_grad():
        x = torch.cat([embed(weights, tokens[s:s + 8]).to(device=device, dtype=torch.float32)
                       for s in range(0, tokens.shape[0], 8)])
        for i in range(last + 1):
            yield i, x, rope
            if i < last:
                frozen = _layer_on(weights, i, device)
                x = torch.cat([layer_forward(frozen, x[s:s + 8], rope, weights.args, QuantConfig())
                               for s in range(0, x.shape[0], 8)])


def _layer_on(weights: ModelWeights, i: int, device: torch.device) -> Params:
    return {k: v.to(device=device, dtype=torch.float32) for k, v in weights.layers[i].items()}


def fold_for_plot(
    weights: ModelWeights, i: int, flat: Params, qcfg: QuantConfig, tcfg: TransformConfig, *,
    quantize_weights: bool, device: torch.device | str = "cpu",
) -> Params:
    """Layer ``i`` folded with a method's flat parameters (fp32 on ``device``).

    ``flat = {}`` (RTN) gives the original weights.
    """
    device = torch.device(device)
    frozen = _layer_on(weights, i, device)
    f = {k: v.to(device=device, dtype=torch.float32) for k, v in flat.items()}
    with torch.no_grad():
        return fold_layer(f, frozen, weights.args, qcfg, tcfg.kind, quantize_weights=quantize_weights)


def linear_inputs(
    folded: Params,
    x: Tensor,  # (B, T, hidden) the layer's input hidden state
    rope: Rope,
    args,
    qcfg: QuantConfig | None = None,
) -> tuple[dict[str, Tensor], Tensor]:  # ({linear: (B, T, d_in)}, layer output (B, T, hidden))
    """The input each linear receives in ``layer_forward`` of a folded layer (after online transforms).

    With ``qcfg=None`` the forward runs unquantized (the inputs are the transformed FP activations);
    otherwise activations are fake-quantized by ``qcfg`` and the recorded inputs are the ones
    *before* each linear's input quantizer.
    """
    seen: dict[str, Tensor] = {}

    def record(p: Params, name: str, xin: Tensor, spec) -> Tensor:
        seen[name] = xin.detach()
        return linear(p, name, xin, spec)

    with torch.no_grad():
        out = layer_forward(folded, x, rope, args, qcfg or QuantConfig(), linear_fn=record)
    return seen, out


def flatness_stats(
    weights: ModelWeights,
    flats_by_method: dict[str, list[Params]],
    tcfg_by_method: dict[str, TransformConfig],
    qcfg: QuantConfig,
    tokens: Tensor,  # (N, T) int64
    layers: Sequence[int],
    *,
    sites: Sequence[str] = ("qkv", "down"),
    reduce: Reduce = "max",
    device: torch.device | str = "cpu",
) -> dict[str, dict[int, dict[str, dict[str, Tensor]]]]:
    """Sorted channel magnitudes behind Figure 1.

    Args:
        flats_by_method: each method's per-layer flat parameters (an empty list, or empty dicts,
            mean "no transform": the original model).
        tcfg_by_method: each method's transform config (its ``kind`` selects the parametrisation).
        qcfg: bit settings (decides which transforms exist when folding).
        tokens: the windows whose activations are measured.
        layers: layer indices (negative counts from the end).
        sites: keys of :data:`SITES`.

    Returns:
        ``stats[method][layer][site] = {"weight": (n,), "act": (n,)}``, each sorted descending, where the
        weight is the site's consumers stacked along the output dimension (e.g. ``[q; k; v]``).
    """
    n_layers = weights.args.n_layers
    wanted = sorted({i % n_layers for i in layers})
    for s in sites:
        if s not in SITES:
            raise ValueError(f"unknown site {s!r}; choose from {', '.join(SITES)}")
    stats: dict[str, dict[int, dict[str, dict[str, Tensor]]]] = {m: {} for m in flats_by_method}
    for i, x, rope in fp_layer_inputs(weights, tokens, device=device, upto=wanted[-1]):
        if i not in wanted:
            continue
        for method, flats in flats_by_method.items():
            flat = flats[i] if flats else {}
            folded = fold_for_plot(weights, i, flat, qcfg, tcfg_by_method[method], quantize_weights=False,
                                   device=device)
            acts, _ = linear_inputs(folded, x, rope, weights.args)
            stats[method][i] = {}
            for s in sites:
                names = SITES[s]
                w = torch.cat([folded[f"{n}.weight"] for n in names], 0)
                stats[method][i][s] = {"weight": channel_magnitudes(w, reduce=reduce),
                                       "act": channel_magnitudes(acts[names[0]], reduce=reduce)}
            log.debug("layer %d %s: %s", i, method,
                      {s: round(flatness_ratio(v["act"]), 1) for s, v in stats[method][i].items()})
    return stats


def mse_stats(
    weights: ModelWeights,
    flats_by_method: dict[str, list[Params]],
    tcfg_by_method: dict[str, TransformConfig],
    qcfg: QuantConfig,
    tokens: Tensor,  # (N, T) int64
    *,
    device: torch.device | str = "cpu",
) -> dict[str, dict[str, Tensor]]:
    """Quantization errors behind Figure 2, for every layer.

    Each layer gets the FP model's hidden state as input (the calibration objective, no error
    propagated from earlier layers). Per method the layer is folded with fake-quantized weights and
    run with ``qcfg``'s activation and KV quantizers.

    Returns:
        ``{"layer_out": {method: (L,)}, "act": {method: (L,)}, "token": {method: (T,)}}``: the output
        MSE against the FP layer; the relative error ``‖Q(x)−x‖² / ‖x‖²`` of the seven linears' inputs
        (summed over them; Q = the activation quantizer with that linear's LAC); and the output MSE per
        token position averaged over samples and layers.
    """
    args = weights.args
    n, t = tokens.shape
    out: dict[str, dict[str, Tensor]] = {"layer_out": {}, "act": {}, "token": {}}
    for m in flats_by_method:
        out["layer_out"][m] = torch.zeros(args.n_layers)
        out["act"][m] = torch.zeros(args.n_layers)
        out["token"][m] = torch.zeros(t)
    for i, x, rope in fp_layer_inputs(weights, tokens, device=device):
        with torch.no_grad():
            ref = layer_forward(_layer_on(weights, i, x.device), x, rope, args, QuantConfig())
        for method, flats in flats_by_method.items():
            flat = flats[i] if flats else {}
            folded = fold_for_plot(weights, i, flat, qcfg, tcfg_by_method[method], quantize_weights=True,
                                   device=x.device)
            acts, y = linear_inputs(folded, x, rope, args, qcfg)
            err = (y.float() - ref.float()).pow(2)  # (N, T, hidden)
            out["layer_out"][method][i] = err.mean().cpu()
            out["token"][method] += err.mean(dim=(0, 2)).cpu() / args.n_layers
            num = sum(float((quant_act(folded, k, a, qcfg.a) - a).pow(2).sum()) for k, a in acts.items())
            den = sum(float(a.pow(2).sum()) for a in acts.values())
            out["act"][method][i] = num / max(den, 1e-30)
        log.debug("layer %d: output MSE %s", i, {m: f"{float(v[i]):.3g}" for m, v in out["layer_out"].items()})
    return out


def _label(method: str) -> str:
    return METHOD_LABEL.get(method, method)


def _style(method: str, k: int) -> tuple[str, str]:
    return METHOD_STYLE.get(method, (f"C{k}", "-"))


def _new_figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def flatness_figure(
    weights: ModelWeights,
    flats_by_method: dict[str, list[Params]],
    tcfg_by_method: dict[str, TransformConfig],
    qcfg: QuantConfig,
    tokens: Tensor,  # (N, T) int64
    layers: Sequence[int],
    out_path: Path,
    *,
    sites: Sequence[str] = ("qkv", "down"),
    reduce: Reduce = "max",
    device: torch.device | str = "cpu",
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Write Figure 1: sorted per-channel magnitudes of weights (left) and activations (right).

    One row per (layer, site); one curve per method, log-scaled y. The legend gives each curve's
    ``max/mean`` ratio (1 = perfectly flat). Arguments as in :func:`flatness_stats`.

    Returns:
        ``out_path`` (a PNG).
    """
    stats = flatness_stats(weights, flats_by_method, tcfg_by_method, qcfg, tokens, layers, sites=sites,
                           reduce=reduce, device=device)
    log.info("activation max/mean channel ratio (geometric mean over layers and sites): %s",
             {m: round(r, 2) for m, r in ratio_summary(stats).items()})
    n_layers = weights.args.n_layers
    rows = [(i % n_layers, s) for i in layers for s in sites]
    fig, axes = _new_figure(len(rows), 2, (12, 2.9 * len(rows) + 0.6))
    what = "max |·|" if reduce == "max" else "L2 norm"
    for r, (i, s) in enumerate(rows):
        for c, kind in enumerate(("weight", "act")):
            ax = axes[r][c]
            for k, method in enumerate(flats_by_method):
                mags = stats[method][i][s][kind]
                color, ls = _style(method, k)
                ax.plot(range(1, mags.numel() + 1), mags.numpy(), color=color, linestyle=ls, linewidth=1.4,
                        label=f"{_label(method)} (max/mean {flatness_ratio(mags):.1f})")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.25)
            names = "/".join(SITES[s])
            sub = f"W = [{'; '.join(SITES[s])}]" if kind == "weight" else SITE_TITLES[s]
            ax.set_title(f"layer {i} · {'weight' if kind == 'weight' else 'activation'}: {sub}", fontsize=10)
            ax.set_xlabel("input channel (sorted by magnitude)")
            ax.set_ylabel(f"per-channel {what}")
            ax.legend(fontsize=8, loc="upper right", title=names if kind == "act" else None, title_fontsize=8)
    fig.suptitle(title or f"Channel magnitudes per method ({qcfg.tag}; folded weights, transformed activations)",
                 fontsize=12)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    log.info("wrote %s", out_path)
    return out_path


def mse_figure(
    weights: ModelWeights,
    flats_by_method: dict[str, list[Params]],
    tcfg_by_method: dict[str, TransformConfig],
    qcfg: QuantConfig,
    tokens: Tensor,  # (N, T) int64
    out_path: Path,
    *,
    device: torch.device | str = "cpu",
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Write Figure 2: quantization error across layers (output and activation) and across tokens.

    Arguments as in :func:`mse_stats`; every layer of the model is measured.

    Returns:
        ``out_path`` (a PNG).
    """
    st = mse_stats(weights, flats_by_method, tcfg_by_method, qcfg, tokens, device=device)
    fig, axes = _new_figure(1, 3, (17, 4.6))
    panels = [("layer_out", "layer index", "MSE of the layer output vs FP", "(a) layer output error per layer"),
              ("act", "layer index", "relative error ‖Q(x)−x‖²/‖x‖²", "(b) activation quantization error (7 linears)"),
              ("token", "token position", "MSE of the layer output vs FP", "(c) output error per token (layer mean)")]
    for ax, (key, xl, yl, tl) in zip(axes[0], panels, strict=True):
        for k, method in enumerate(flats_by_method):
            v = st[key][method].numpy()
            color, ls = _style(method, k)
            mean = float(v.mean())
            ax.plot(range(v.size), v, color=color, linestyle=ls, linewidth=1.3,
                    marker="o" if key != "token" and v.size <= 40 else None, markersize=3,
                    label=f"{_label(method)} (mean {mean:.3g})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(tl, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Quantization error per method ({qcfg.tag}; each layer fed FP hidden states)",
                 fontsize=12)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    log.info("wrote %s", out_path)
    return out_path


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """``"0,14,-1"`` → layer indices (negative counts from the end); ``""`` → first, middle, last."""
    if not spec.strip():
        return sorted({0, n_layers // 2, n_layers - 1})
    out = []
    for part in spec.split(","):
        i = int(part)
        if not -n_layers <= i < n_layers:
            raise ValueError(f"layer {i} out of range for a {n_layers}-layer model")
        out.append(i % n_layers)
    return out


def baseline_flats(
    weights: ModelWeights, calib_tokens: Tensor, qcfg: QuantConfig, *, seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, list[Params]], dict[str, TransformConfig]]:
    """Flat parameters of the baselines, built with the calibration loop: every registered method that quantizes
    and trains nothing (RTN, SmoothQuant-style, QuaRot-style), in registry order.

    The ones that need data (SmoothQuant's activation maxima) take their statistics on ``calib_tokens (N, T)``.
    """
    n = calib_tokens.shape[0]
    bs = max(b for b in (4, 3, 2, 1) if n % b == 0)
    ccfg = CalibConfig(nsamples=n, seqlen=calib_tokens.shape[1], batch_size=bs, epochs=0, seed=seed)
    flats: dict[str, list[Params]] = {}
    tcfgs: dict[str, TransformConfig] = {}
    for m in METHODS.values():
        if not m.quantize or m.trained:
            continue
        log.info("building %s transforms", m.name)
        flats[m.name] = calibrate(weights, calib_tokens if m.needs_data else None, qcfg, m.layer, ccfg, device=device)
        tcfgs[m.name] = m.layer
    return flats, tcfgs


def write_figures(
    weights: ModelWeights,
    calib_tokens: Tensor,  # (N, T) int64: the SmoothQuant statistics are taken on these
    test_tokens: Tensor,  # (N, T) int64: the plotted activations and errors are measured on these
    qcfg: QuantConfig,
    out_dir: Path,
    *,
    layers: Sequence[int],
    flatquant: tuple[list[Params], TransformConfig] | None = None,
    flatquant_calib: dict | None = None,
    sites: Sequence[str] = ("qkv", "down"),
    reduce: Reduce = "max",
    seed: int = 0,
    device: torch.device | str = "cpu",
    name: str = "",
) -> tuple[Path, Path]:
    """Build the baselines (:func:`baseline_flats`), add FlatQuant's transforms, write both figures.

    Args:
        layers: layer indices of Figure 1 (see :func:`parse_layers`).
        flatquant: calibrated FlatQuant transforms and their config (e.g. from
            :func:`flatquant.io.load_transforms`); without them only the baselines are drawn.
        flatquant_calib: the calibration settings recorded with those transforms (``nsamples``, ``seqlen``,
            ``epochs``), named in the titles.
        name: the model's name in the titles.

    Returns:
        The paths of ``out_dir/flatness.png`` (Figure 1) and ``out_dir/mse.png`` (Figure 2).
    """
    flats, tcfgs = baseline_flats(weights, calib_tokens, qcfg, seed=seed, device=device)
    if flatquant is not None:
        flats["flatquant"], tcfgs["flatquant"] = flatquant
    span = f"{test_tokens.shape[0]}×{test_tokens.shape[1]} held-out tokens"
    if flatquant is not None and isinstance(flatquant_calib, dict):
        c = flatquant_calib
        span += (f"\nFlatQuant transforms calibrated on {c.get('nsamples')}×{c.get('seqlen')} tokens, "
                 f"{c.get('epochs')} epoch(s)")
    fig1 = flatness_figure(weights, flats, tcfgs, qcfg, test_tokens, layers, Path(out_dir) / "flatness.png",
                           sites=sites, reduce=reduce, device=device,
                           title=f"{name}: sorted per-channel {'max |·|' if reduce == 'max' else 'L2 norm'} of "
                                 f"folded weights and of the activations the linears see ({qcfg.tag}, {span})")
    fig2 = mse_figure(weights, flats, tcfgs, qcfg, test_tokens, Path(out_dir) / "mse.png", device=device,
                      title=f"{name}: {qcfg.tag} quantization error per layer and per token ({span}; each layer fed "
                            f"FP hidden states)")
    return fig1, fig2


def ratio_summary(stats: dict[str, dict[int, dict[str, dict[str, Tensor]]]]) -> dict[str, float]:
    """Geometric mean over layers and sites of the activations' ``max/mean`` ratio, per method."""
    out = {}
    for m, by_layer in stats.items():
        r = [flatness_ratio(v["act"]) for sites in by_layer.values() for v in sites.values()]
        out[m] = math.exp(sum(math.log(x) for x in r) / max(len(r), 1))
    return out
