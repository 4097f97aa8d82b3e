"""The decoder layer (``flatquant/models/layer.py``): one skeleton, :func:`decoder_layer`, run by the fake forward
(:func:`layer_forward`) and by the real engine (:func:`flatquant.models.real.step.layer_step` and the compiled
``decode_layer``), which agree through it.

The layer has random non-orthogonal transforms at every site (Kronecker before q/k/v, gate/up and down, head mixing
before o_proj, the K transform), so a transform applied in one implementation and not the other moves the output by
far more than the tolerance. The engine runs its fallback linears (:class:`FakeLinear`: the same function as the
fake forward's linears), with the quantizers off and at W4A4KV4 (packed KV4 cache, the kv4 decode kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import flatquant.models.layer as layer_mod
import flatquant.models.real.step as step_mod
from flatquant.calib.methods import method_config
from flatquant.core.norm import rms_norm
from flatquant.core.spec import QuantConfig
from flatquant.models.args import ModelArgs
from flatquant.models.flat import fold_layer, init_flat_params
from flatquant.models.layer import Params, decoder_layer, layer_forward, make_rope, qk_pre_rope, rms_norm_fn
from flatquant.models.real import RealConfig, decode_layer, layer_from_tensors, layer_step, new_cache, rope_at
from flatquant.models.real.checkpoint import export_layer
from flatquant.models.real.step import Normed
from flatquant.presets import bits_preset
from tests.helpers import TINY, tiny_model

Q = bits_preset("w4a4kv4")
T = method_config("flatquant", diag_init="ones")
QCFGS = {"bits16": QuantConfig(), "w4a4kv4": Q}


def _folded(qcfg: QuantConfig, seed: int = 0, args: ModelArgs = TINY) -> tuple[Params, torch.Tensor]:
    """A folded layer (fp32) with random transforms away from orthogonal / identity, and ``rope.inv_freq``."""
    w = tiny_model(args, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    p = w.layers[0]
    trainable, fixed = init_flat_params(p, args, Q, T, absmax=None, generator=g)
    flat = {k: v.double() for k, v in {**trainable, **fixed}.items() if ".lwc." not in k}
    for k in flat:
        if k.endswith((".sigma", ".diag")):
            flat[k] = flat[k] * torch.exp(0.3 * torch.randn(flat[k].shape, generator=g, dtype=torch.float64))
    folded = fold_layer(flat, {k: v.double() for k, v in p.items()}, args, qcfg, T.kind)
    if not qcfg.a.enabled:
        folded = {k: v for k, v in folded.items() if ".lac." not in k}
    assert {"ln_trans.left", "up_gate_trans.left", "down_trans.left", "o_trans", "k_trans"} <= set(folded)
    return {k: v.float() for k, v in folded.items()}, w.top["rope.inv_freq"]


def _spy(calls: list[dict[str, Any]]):
    """:func:`decoder_layer` itself, recording the arguments of every call."""

    def spy(x: torch.Tensor, **kw: Any) -> torch.Tensor:
        calls.append(kw)
        return decoder_layer(x, **kw)

    return spy


@pytest.mark.parametrize("name", list(QCFGS))
def test_fake_forward_and_real_engine_run_one_skeleton_and_agree(name: str, monkeypatch) -> None:
    """``layer_forward`` and the engine (prefill ``layer_step``, then the decode step) each call
    :func:`decoder_layer` (spied on, not replaced), give the same layer output, and pass it the same norms and
    callables that agree one by one."""
    qcfg = QCFGS[name]
    folded, inv_freq = _folded(qcfg)
    cfg = RealConfig(args=TINY, qcfg=qcfg, dtype=torch.float32, real_linears=False)
    layer = layer_from_tensors(export_layer(folded, qcfg, dtype=torch.float32, real=False), cfg)
    b, t = 2, 7
    x = torch.randn(b, t, TINY.hidden, generator=torch.Generator().manual_seed(3))
    rope = make_rope(inv_freq, torch.arange(t))
    if qcfg.a.enabled:  # the comparison includes the quantization error
        assert (layer_forward(folded, x, rope, TINY, qcfg) - layer_forward(folded, x, rope, TINY, QuantConfig())
                ).abs().max() > 1e-2
    fake_calls: list[dict[str, Any]] = []
    real_calls: list[dict[str, Any]] = []
    monkeypatch.setattr(layer_mod, "decoder_layer", _spy(fake_calls))
    monkeypatch.setattr(step_mod, "decoder_layer", _spy(real_calls))

    want = layer_forward(folded, x, rope, TINY, qcfg)
    cache = new_cache(cfg, b, t, "cpu")
    kv, start = cache.layers[0], cache.start
    pos = torch.arange(t)
    pre = layer_step(layer, x[:, :-1], rope_at(inv_freq, pos[None, :-1].expand(b, -1), 1.0), kv, cfg, pos[:-1],
                     start, torch.full((b,), t - 1, dtype=torch.int32), n_valid=t - 1, decode=False,
                     causal_from_zero=True, k_packed=cache.k_packed, v_packed=cache.v_packed)
    dec = decode_layer(layer, x[:, -1:], rope_at(inv_freq, pos[None, -1:].expand(b, 1), 1.0), kv, cfg, pos[-1:],
                       start, torch.full((b,), t, dtype=torch.int32))
    assert cache.k_packed == (name == "w4a4kv4")
    torch.testing.assert_close(torch.cat([pre, dec], 1), want, rtol=1e-5, atol=1e-5)
    assert len(fake_calls) == 1 and len(real_calls) == 2  # the fake forward, the engine's prefill and decode

    # part by part through the skeleton: the same norms, and each callable the same function of its input (the
    # engine's prefill attention covers the first t - 1 positions; causal, so the fake's first t - 1 rows)
    f, r = fake_calls[0], real_calls[0]
    assert torch.equal(f["input_norm"], r["input_norm"]) and torch.equal(f["post_norm"], r["post_norm"])
    g = torch.Generator().manual_seed(4)
    h = torch.randn(b, t, TINY.hidden, generator=g)
    res = torch.randn(b, t, TINY.hidden, generator=g)
    o = torch.randn(b, t, TINY.q_dim, generator=g)
    gate, up = (torch.randn(b, t, TINY.intermediate, generator=g) for _ in range(2))
    assert torch.equal(r["norm"](h, f["post_norm"]), f["norm"](h, f["post_norm"]))
    assert torch.equal(f["norm"](h, f["post_norm"]), rms_norm(h, f["post_norm"], TINY.rms_eps))
    # the decode step defers its norms into the fused transform kernels: the same normalised input
    deferred = real_calls[1]["norm"](h, f["input_norm"])
    assert isinstance(deferred, Normed) and torch.equal(deferred.value(), f["norm"](h, f["input_norm"]))
    torch.testing.assert_close(r["attention"](h[:, :-1]), f["attention"](h)[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["o_proj"](o, res), f["o_proj"](o, res), rtol=1e-5, atol=1e-5)
    for got, exp in zip(r["gate_up"](h), f["gate_up"](h), strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["down"](gate, up, res), f["down"](gate, up, res), rtol=1e-5, atol=1e-5)


def test_decoder_layer_structure() -> None:
    """Pre-norm attention, residual, pre-norm SwiGLU, residual: the callables see what the skeleton says."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)
    n1, n2 = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5
    wa, wo, wg, wu, wd = (torch.randn(8, 8, generator=g) for _ in range(5))
    seen: list[str] = []

    def lin(tag: str, w: torch.Tensor):
        def f(v: torch.Tensor) -> torch.Tensor:
            seen.append(tag)
            return v @ w
        return f

    out = decoder_layer(x, input_norm=n1, post_norm=n2, norm=rms_norm_fn(1e-6), attention=lin("attention", wa),
                        o_proj=lambda o, res: res + lin("o_proj", wo)(o),
                        gate_up=lambda h: (lin("gate", wg)(h), lin("up", wu)(h)),
                        down=lambda gate, up, res: res + lin("down", wd)(torch.nn.functional.silu(gate) * up))

    def norm(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    y = x + norm(x, n1) @ wa @ wo
    hn = norm(y, n2)
    torch.testing.assert_close(out, y + (torch.nn.functional.silu(hn @ wg) * (hn @ wu)) @ wd)
    assert seen == ["attention", "o_proj", "gate", "up", "down"]


def test_family_qk_math_is_one_function_for_the_fake_forward_and_the_engine(monkeypatch) -> None:
    """Qwen3's q/k norms: the fake attention and the engine's ``attention_step`` both call :func:`qk_pre_rope`
    (spied on, not replaced) with the family's tensors and the same ``(B, T, heads, d)`` q and k, and agree."""
    args = dataclasses.replace(TINY, arch="qwen3", qk_norm=True)
    folded, inv_freq = _folded(QuantConfig(), args=args)
    cfg = RealConfig(args=args, qcfg=QuantConfig(), dtype=torch.float32, real_linears=False)
    layer = layer_from_tensors(export_layer(folded, QuantConfig(), dtype=torch.float32, real=False), cfg)
    assert set(layer.extra) == {"q_norm", "k_norm"} and torch.equal(layer.extra["q_norm"], folded["q_norm"])
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, set[str]]]] = {"fake": [], "real": []}

    def spy(where: str):
        def f(q: torch.Tensor, k: torch.Tensor, p: Params, a: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
            calls[where].append((q, k, {n for n in ("q_norm", "k_norm") if n in p}))
            return qk_pre_rope(q, k, p, a)
        return f

    monkeypatch.setattr(layer_mod, "qk_pre_rope", spy("fake"))
    monkeypatch.setattr(step_mod, "qk_pre_rope", spy("real"))
    b, t = 2, 5
    x = torch.randn(b, t, args.hidden, generator=torch.Generator().manual_seed(3))
    want = layer_forward(folded, x, make_rope(inv_freq, torch.arange(t)), args, QuantConfig())
    cache = new_cache(cfg, b, t, "cpu")
    pos = torch.arange(t)
    got = layer_step(layer, x, rope_at(inv_freq, pos[None].expand(b, -1), 1.0), cache.layers[0], cfg, pos,
                     cache.start, torch.full((b,), t, dtype=torch.int32), n_valid=t, decode=False,
                     causal_from_zero=True, k_packed=cache.k_packed, v_packed=cache.v_packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls["fake"]) == len(calls["real"]) == 1
    (fq, fk, fnames), (rq, rk, rnames) = calls["fake"][0], calls["real"][0]
    assert fnames == rnames == {"q_norm", "k_norm"}
    assert fq.shape == rq.shape == (b, t, args.n_heads, args.head_dim) and fk.shape == rk.shape == (
        b, t, args.n_kv_heads, args.head_dim)
    torch.testing.assert_close(rq, fq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk, fk, rtol=1e-5, atol=1e-5)
    q2, k2 = qk_pre_rope(fq, fk, folded, args)  # the norms act: per head, over d
    assert not torch.allclose(q2, fq) and not torch.allclose(k2, fk)
