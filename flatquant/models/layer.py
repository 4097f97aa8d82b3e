"""The functional decoder layer: its skeleton (:func:`decoder_layer`, shared with the real engine) and the forward
over a parameter dict (:func:`layer_forward`).

One forward serves the FP model, the fake-quantized calibration model and the folded (merged)
model: which transforms run online is decided by which keys the dict holds, and quantizers with
``bits >= 16`` are the identity. Keys of a *folded* layer dict:

* ``input_norm``, ``post_norm`` (hidden,): RMSNorm weights (diag scales merged in).
* the family's extra tensors (:data:`~flatquant.models.args.LAYER_TENSORS`, e.g. Qwen3's ``q_norm``, ``k_norm``
  (head_dim,)), read by :func:`qk_pre_rope`.
* ``{linear}.weight`` (out, in), optional ``{linear}.bias``: effective (possibly fake-quantized) weights.
* ``{linear}.lac.lo|hi`` (1,): activation clip logits of that linear's input quantizer.
* ``ln_trans.left|right``, ``up_gate_trans.left|right``, ``down_trans.left|right``: online Kronecker factors.
* ``o_trans`` (H, H): online head mixing before o_proj; ``k_trans``, ``k_trans_inv_t`` (d, d).
* ``q_quant|k_cache|v_cache.lac.lo|hi`` (1,): clip logits of the query / KV-cache quantizers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.clip import clip_factor
from ..core.kron import head_mix, head_transform, kron_transform
from ..core.norm import rms_norm
from ..core.quant import fake_quant
from ..core.recompute import recompute_in_backward
from ..core.spec import QuantConfig, QuantSpec
from .args import ModelArgs
from .sites import SITES

Params = dict[str, Tensor]
LinearFn = Callable[[Params, str, Tensor, QuantSpec], Tensor]


@dataclass(frozen=True)
class Rope:
    """Precomputed rotary tables for a run of positions."""

    cos: Tensor  # (T, head_dim)
    sin: Tensor  # (T, head_dim)


def make_rope(inv_freq: Tensor, positions: Tensor, scaling: float = 1.0, dtype: torch.dtype = torch.float32) -> Rope:
    """Rotary cos/sin tables as HF Llama computes them (``cat(freqs, freqs)``, times ``scaling``)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return Rope(cos=(emb.cos() * scaling).to(dtype), sin=(emb.sin() * scaling).to(dtype))


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:  # x: (B, heads, T, d)
    """Rotate ``x`` by the rotary tables."""
    return x * rope.cos.to(x.dtype) + _rotate_half(x) * rope.sin.to(x.dtype)


def qk_pre_rope(
    q: Tensor,  # (B, T, heads, d)
    k: Tensor,  # (B, T, kv_heads, d)
    p: Params,
    args: ModelArgs,
) -> tuple[Tensor, Tensor]:  # same shapes
    """A family's math on the projected q and k before RoPE, written once: the fake attention (:func:`attention`)
    and the real engine's (:func:`flatquant.models.real.step.attention_step`) both call it.

    ``p`` holds the family's layer tensors (:data:`~flatquant.models.args.LAYER_TENSORS`) by name: the layer dict
    (fake path), or :attr:`RealLayer.extra <flatquant.models.real.weights.RealLayer.extra>` (engine). Both pass
    the ``(B, T, heads, d)`` layout the projections produce, so ``q.flatten(-2)`` is the projection output.
    """
    if "q_norm" in p:  # Qwen3: per-head RMSNorm of q and k
        q, k = rms_norm(q, p["q_norm"], args.rms_eps), rms_norm(k, p["k_norm"], args.rms_eps)
    return q, k


def quant_act(p: Params, prefix: str, x: Tensor, spec: QuantSpec, *, recompute: bool = False) -> Tensor:
    """Per-token fake quantization of ``x`` with the clip logits stored under ``prefix.lac``.

    ``recompute`` (training) keeps only ``x`` and the logits for backward and recomputes the
    quantizer's intermediates there (same gradients, less activation memory).
    """
    if not spec.enabled:
        return x
    logits = {k: p[f"{prefix}.lac.{k}"] for k in ("lo", "hi") if f"{prefix}.lac.{k}" in p}

    def chain(xx: Tensor, *ls: Tensor) -> Tensor:
        c = {k: clip_factor(v) for k, v in zip(logits, ls, strict=True)}
        return fake_quant(xx, spec, clip_lo=c.get("lo"), clip_hi=c.get("hi"))

    return recompute_in_backward(chain, x, *logits.values()) if recompute else chain(x, *logits.values())


def linear(p: Params, name: str, x: Tensor, a_spec: QuantSpec, *, recompute: bool = False) -> Tensor:
    """Input fake-quant (with this linear's LAC) followed by ``x Wᵀ + b``."""
    x = quant_act(p, name, x, a_spec, recompute=recompute)
    return F.linear(x, p[f"{name}.weight"].to(x.dtype), p.get(f"{name}.bias"))


def _kron(p: Params, site: str, x: Tensor) -> Tensor:
    left = p.get(f"{site}.left")
    if left is None:
        return x
    return kron_transform(x, left, p[f"{site}.right"])


def attention(
    p: Params, x: Tensor, rope: Rope, args: ModelArgs, qcfg: QuantConfig, linear_fn: LinearFn = linear,
    *, recompute: bool = False,
) -> Tensor:  # x: (B, T, hidden) normalised input -> (B, T, H*d) attention output before o_proj
    """Q/K/V projections, the family's q/k math (:func:`qk_pre_rope`), RoPE, K transform, Q/K/V quantization,
    causal softmax attention."""
    b, t, _ = x.shape
    q = linear_fn(p, "q_proj", x, qcfg.a).view(b, t, args.n_heads, args.head_dim)
    k = linear_fn(p, "k_proj", x, qcfg.a).view(b, t, args.n_kv_heads, args.head_dim)
    v = linear_fn(p, "v_proj", x, qcfg.a).view(b, t, args.n_kv_heads, args.head_dim).transpose(1, 2)
    q, k = qk_pre_rope(q, k, p, args)
    q, k = apply_rope(q.transpose(1, 2), rope), apply_rope(k.transpose(1, 2), rope)
    if "k_trans" in p:
        q = head_transform(q, p["k_trans_inv_t"])
        k = head_transform(k, p["k_trans"])
    q = quant_act(p, "q_quant", q, qcfg.q, recompute=recompute)
    k = quant_act(p, "k_cache", k, qcfg.k, recompute=recompute)
    v = quant_act(p, "v_cache", v, qcfg.v, recompute=recompute)
    rep = args.n_heads // args.n_kv_heads
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(b, t, args.q_dim)


H = TypeVar("H")


def decoder_layer(
    x: Tensor,  # (B, T, hidden)
    *,
    input_norm: Tensor,  # (hidden,)
    post_norm: Tensor,  # (hidden,)
    norm: Callable[[Tensor, Tensor], H],  # (B, T, hidden), weight -> normalised input
    attention: Callable[[H], Tensor],  # normalised -> (B, T, H*d)
    o_proj: Callable[[Tensor, Tensor], Tensor],  # (B, T, H*d), residual (B, T, hidden) -> (B, T, hidden)
    gate_up: Callable[[H], tuple[Tensor, Tensor]],  # normalised -> 2 x (B, T, intermediate)
    down: Callable[[Tensor, Tensor, Tensor], Tensor],  # gate, up, residual -> (B, T, hidden)
) -> Tensor:  # (B, T, hidden)
    """The decoder layer's skeleton, written once: pre-norm attention and pre-norm SwiGLU MLP with residuals.

    The fake forward (:func:`layer_forward`: calibration, the fake model, GPTQ) and the real engine
    (:func:`flatquant.models.real.step.layer_step`) both run it; they pass their own callables, which own every
    online transform and quantizer of their site (a Kronecker transform before q/k/v inside ``attention``, head
    mixing inside ``o_proj``, ...) and, for the engine, the KV-cache writes. The skeleton keeps no state and
    branches on nothing, so it traces into one graph (``torch.compile(fullgraph=True)``, ``torch.func``).

    Args:
        x: the layer input (residual stream).
        input_norm, post_norm: RMSNorm weights before attention and before the MLP.
        norm: ``norm(x, weight)``, the RMSNorm (:func:`rms_norm_fn`). Its result goes only to ``attention`` and
            ``gate_up``, so an engine may return a deferred norm that their transform kernel applies.
        attention: the attention output before ``o_proj`` of the normalised input.
        o_proj: ``o_proj(o, x)``: the residual ``x`` plus the output projection of the attention output ``o``.
        gate_up: ``(gate, up)`` projections of the normalised MLP input.
        down: ``down(gate, up, x)``: the residual ``x`` plus the down projection of ``silu(gate) * up``
            (:func:`swiglu`). The engine forms the product inside its transform kernel and may add the residual
            in its GEMM's epilogue.

    Returns:
        The layer output: ``x1 = o_proj(attention(norm(x, input_norm)), x)`` (the residual plus the attention
        branch), then ``down(gate, up, x1)`` with ``gate, up = gate_up(norm(x1, post_norm))``.
    """
    x = o_proj(attention(norm(x, input_norm)), x)
    gate, up = gate_up(norm(x, post_norm))
    return down(gate, up, x)


def rms_norm_fn(eps: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The skeleton's ``norm`` for RMSNorm with epsilon ``eps``: ``(x, weight) -> rms_norm(x, weight, eps)``."""
    return functools.partial(rms_norm, eps=eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:  # 2 x (B, T, intermediate) -> (B, T, intermediate)
    """The SwiGLU activation ``silu(gate) * up`` that feeds down_proj."""
    return F.silu(gate) * up


def layer_forward(
    p: Params,
    x: Tensor,  # (B, T, hidden)
    rope: Rope,
    args: ModelArgs,
    qcfg: QuantConfig,
    *,
    linear_fn: LinearFn | None = None,
    recompute: bool = False,
) -> Tensor:  # (B, T, hidden)
    """One decoder layer (:func:`decoder_layer`) over a parameter dict, the online transforms its keys name.

    ``linear_fn(p, name, x, a_spec)`` computes each of the seven linears (default: fake-quant input,
    then ``F.linear``); GPTQ passes one that also records the quantized inputs. ``recompute``
    (training) recomputes every activation quantizer in backward (see :func:`quant_act`).
    """
    lin: LinearFn = functools.partial(linear, recompute=recompute) if linear_fn is None else linear_fn

    def attend(h: Tensor) -> Tensor:  # (B, T, hidden) -> (B, T, H*d)
        return attention(p, _kron(p, "ln_trans", h), rope, args, qcfg, lin, recompute=recompute)

    def o_proj(o: Tensor, res: Tensor) -> Tensor:  # (B, T, H*d), (B, T, hidden) -> (B, T, hidden)
        return res + lin(p, "o_proj", head_mix(o, p["o_trans"]) if "o_trans" in p else o, qcfg.a)

    def gate_up(h: Tensor) -> tuple[Tensor, Tensor]:  # (B, T, hidden) -> 2 x (B, T, intermediate)
        h = _kron(p, "up_gate_trans", h)
        up = lin(p, "up_proj", h, qcfg.a)
        return lin(p, "gate_proj", h, qcfg.a), up

    def down(gate: Tensor, up: Tensor, res: Tensor) -> Tensor:  # 2 x (B, T, intermediate), residual -> (B, T, hidden)
        return res + lin(p, "down_proj", _kron(p, "down_trans", swiglu(gate, up)), qcfg.a)

    return decoder_layer(x, input_norm=p["input_norm"], post_norm=p["post_norm"], norm=rms_norm_fn(args.rms_eps),
                         attention=attend, o_proj=o_proj, gate_up=gate_up, down=down)


SITE_INPUTS = {s.linears[0]: s.transform for s in SITES if s.kron}
"""The first linear of each Kronecker site, whose input is the site's activation."""


def fp_forward_with_absmax(
    p: Params, x: Tensor, rope: Rope, args: ModelArgs
) -> tuple[Tensor, dict[str, Tensor]]:  # x: (B, T, hidden)
    """FP layer output and the per-channel max |activation| at the three diag-scale sites, in one forward.

    The sites are the inputs of q_proj (shared by q/k/v), gate_proj (shared with up) and down_proj.

    Returns:
        ``(out, {"ln_trans": (hidden,), "up_gate_trans": (hidden,), "down_trans": (intermediate,)})``.
    """
    stats: dict[str, Tensor] = {}

    def recording_linear(pp: Params, name: str, xin: Tensor, spec: QuantSpec) -> Tensor:
        if name in SITE_INPUTS:
            stats[SITE_INPUTS[name]] = xin.abs().amax(dim=tuple(range(xin.dim() - 1))).float()
        return linear(pp, name, xin, spec)

    out = layer_forward(p, x, rope, args, QuantConfig(), linear_fn=recording_linear)
    return out, stats
