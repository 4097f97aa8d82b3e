"""Transform placement and folding: with quantizers off, every transform is an exact equivalence."""

from __future__ import annotations

import pytest
import torch

from flatquant.core.spec import QuantConfig, TransformConfig
from flatquant.models.args import ModelArgs
from flatquant.models.flat import fold_layer, init_flat_params
from flatquant.models.layer import fp_forward_with_absmax, layer_forward, make_rope
from flatquant.models.random import random_weights
from flatquant.presets import bits_preset

SHAPES = {
    "llama-tiny": ModelArgs(vocab_size=32, hidden=48, intermediate=96, n_layers=1, n_heads=4, n_kv_heads=2,
                            head_dim=12),
    "smollm2-576": ModelArgs(vocab_size=32, hidden=576, intermediate=1536, n_layers=1, n_heads=9, n_kv_heads=3,
                             head_dim=64),
    "qwen2.5-896": ModelArgs(arch="qwen2", vocab_size=32, hidden=896, intermediate=1536, n_layers=1, n_heads=14,
                             n_kv_heads=2, head_dim=64, qkv_bias=True),
    "qwen2.5-3584": ModelArgs(arch="qwen2", vocab_size=32, hidden=3584, intermediate=512, n_layers=1, n_heads=28,
                              n_kv_heads=4, head_dim=128, qkv_bias=True),
}
NOQUANT = QuantConfig()


def _perturb(flat: dict, seed: int) -> dict:
    """Move every parameter away from its init so the test is not passed by near-identity transforms."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in flat.items():
        if k.endswith(".sigma") or k.endswith(".diag"):
            out[k] = v * (0.5 + torch.rand(v.shape, generator=g))
        else:
            out[k] = v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["svd", "inv", "hadamard"])
def test_transforms_are_equivalences_before_and_after_fold(shape, kind):
    args = SHAPES[shape]
    w = random_weights(args, generator=torch.Generator().manual_seed(0), outlier_channels=3, dtype=torch.float64)
    frozen = w.layers[0]
    x = torch.randn(2, 6, args.hidden, dtype=torch.float64)
    rope = make_rope(w.top["rope.inv_freq"], torch.arange(6), dtype=torch.float64)
    ref = layer_forward(frozen, x, rope, args, NOQUANT)
    tcfg = TransformConfig(kind=kind, lwc=False, lac=False, trainable=kind != "hadamard")
    out_fp, stats = fp_forward_with_absmax(frozen, x, rope, args)
    torch.testing.assert_close(out_fp, ref, rtol=0, atol=0)
    assert stats["down_trans"].shape == (args.intermediate,)
    trainable, fixed = init_flat_params(frozen, args, bits_preset("w4a4kv4"), tcfg, absmax=stats,
                                        generator=torch.Generator().manual_seed(1))
    flat = {k: v.double() for k, v in {**fixed, **trainable}.items()}
    if kind != "hadamard":
        flat = _perturb(flat, 2)
    assert {"ln_trans.left.u" if kind == "svd" else "ln_trans.left.m", "o_trans" + (".u" if kind == "svd" else ".m"),
            "k_trans" + (".u" if kind == "svd" else ".m"), "down_trans.diag"} <= set(flat)
    folded = fold_layer(flat, frozen, args, NOQUANT, kind)
    out = layer_forward(folded, x, rope, args, NOQUANT)
    # fixed kinds use P^{-T} = P, exact only up to the fp32 rounding of the stored orthogonal matrix
    tol = 1e-9 if kind != "hadamard" else 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # the transforms really act: the online activations differ from the original ones
    assert not torch.allclose(folded["q_proj.weight"], frozen["q_proj.weight"])


def test_quantized_fold_changes_output_and_transforms_reduce_error():
    args = SHAPES["smollm2-576"]
    w = random_weights(args, generator=torch.Generator().manual_seed(0), outlier_channels=8)
    frozen = w.layers[0]
    x = torch.randn(1, 16, args.hidden)
    rope = make_rope(w.top["rope.inv_freq"], torch.arange(16))
    ref = layer_forward(frozen, x, rope, args, NOQUANT)
    q = bits_preset("w4a4kv4")
    errs = {}
    for kind in ("none", "hadamard"):
        tcfg = TransformConfig(kind=kind, add_diag=False, lwc=False, lac=False, trainable=False)
        t, f = init_flat_params(frozen, args, q, tcfg, absmax=None, generator=torch.Generator().manual_seed(1))
        out = layer_forward(fold_layer({**t, **f}, frozen, args, q, kind), x, rope, args, q)
        errs[kind] = (out - ref).pow(2).mean().item()
    assert errs["none"] > 0
    assert errs["hadamard"] < errs["none"]


def test_no_transforms_without_low_bits():
    args = SHAPES["llama-tiny"]
    w = random_weights(args, generator=torch.Generator().manual_seed(0))
    t, f = init_flat_params(w.layers[0], args, NOQUANT, TransformConfig(), absmax=None,
                            generator=torch.Generator().manual_seed(0))
    assert t == {} and f == {}
    t, f = init_flat_params(w.layers[0], args, bits_preset("w16a16kv4"), TransformConfig(diag_init="ones"),
                            absmax=None, generator=torch.Generator().manual_seed(0))
    assert set(t) == {"k_trans.u", "k_trans.v", "k_trans.sigma", "k_cache.lac.lo", "k_cache.lac.hi",
                      "v_cache.lac.lo", "v_cache.lac.hi"}


def test_recomputed_fold_and_activation_quantizers_give_the_same_gradients():
    from flatquant.calib.methods import method_config
    from flatquant.models.model import embed, rope_for
    from tests.helpers import TINY, tiny_model, tokens

    w = tiny_model(TINY)
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    x = embed(w, tokens(2, 16))
    rope = rope_for(w, 16)
    y, stats = fp_forward_with_absmax(w.layers[0], x, rope, TINY)
    tr, fx = init_flat_params(w.layers[0], TINY, q, t, absmax=stats, generator=torch.Generator().manual_seed(0))

    def loss(p, recompute):
        folded = fold_layer({**fx, **p}, w.layers[0], TINY, q, t.kind, recompute=recompute)
        return layer_forward(folded, x, rope, TINY, q, recompute=recompute).sub(y).pow(2).mean()

    got, want = torch.func.grad(loss)(tr, True), torch.func.grad(loss)(tr, False)
    assert got.keys() == want.keys()
    for k in got:  # equal up to the order in which shared inputs (one P^{-T} for q/k/v) sum their gradients
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5 * float(want[k].abs().max()))
    assert any(g.abs().sum() > 0 for g in got.values())
