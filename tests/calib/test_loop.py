"""Calibration: the loss falls, resume is bit-identical, mismatched work directories are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import CalibrationMismatch, calibrate, fp_layer_pass, train_layer
from flatquant.calib.methods import method_config
from flatquant.calib.workdir import layer_ckpt
from flatquant.models.flat import init_flat_params
from flatquant.models.model import embed, rope_for
from flatquant.presets import bits_preset
from tests.helpers import TINY, TINY_QWEN, tiny_model, tokens

CFG = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=6, lr=5e-3)


@pytest.mark.parametrize("args", [TINY, TINY_QWEN], ids=["llama", "qwen2"])
def test_calibration_loss_falls(args):
    w = tiny_model(args)
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    x = embed(w, tokens(4, 16))
    rope = rope_for(w, 16)
    frozen = w.layers[0]
    outs, stats = fp_layer_pass(frozen, x, rope, args, 2, want_stats=True)
    tr, fx = init_flat_params(frozen, args, q, t, absmax=stats, generator=torch.Generator().manual_seed(0))
    new, losses = train_layer(tr, fx, frozen, x, outs, rope, args, q, t, CFG, generator=torch.Generator(),
                              amp=torch.float32)
    assert losses[-1] < 0.8 * losses[0]
    assert any(not torch.equal(new[k], tr[k]) for k in tr)


def test_resume_equals_uninterrupted(tmp_path):
    w = tiny_model()
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    toks = tokens(4, 16)
    full = calibrate(w, toks, q, t, CFG, workdir=tmp_path / "a")
    calibrate(w, toks, q, t, CFG, workdir=tmp_path / "b")
    ck = tmp_path / "b" / "layers" / "layer_001.safetensors"
    ck.unlink()  # as if killed while layer 1 was training
    before = load_file(str(tmp_path / "b" / "layers" / "layer_000.safetensors"))
    resumed = calibrate(w, toks, q, t, CFG, workdir=tmp_path / "b")
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(before[k], resumed[0][k]) for k in before)


def test_mismatched_workdir_is_refused(tmp_path):
    w = tiny_model()
    toks = tokens(4, 16)
    calibrate(w, toks, bits_preset("w4a4kv4"), method_config("flatquant"), CFG, workdir=tmp_path)
    with pytest.raises(CalibrationMismatch, match="different calibration"):
        calibrate(w, toks, bits_preset("w4a16"), method_config("flatquant"), CFG, workdir=tmp_path)


def test_data_free_methods_need_no_tokens():
    w = tiny_model()
    flats = calibrate(w, None, bits_preset("w4a4kv4"), method_config("quarot"), CFG)
    assert len(flats) == TINY.n_layers and "ln_trans.left.m" in flats[0]
    with pytest.raises(ValueError, match="calibration data"):
        calibrate(w, None, bits_preset("w4a4kv4"), method_config("flatquant"), CFG)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of batch_size"):
        CalibConfig(nsamples=5, batch_size=2)


def test_compiled_step_matches_eager():
    """``compile="on"`` (inductor) trains to the same parameters as eager stepping."""
    from dataclasses import replace

    w = tiny_model()
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    x = embed(w, tokens(4, 16))
    rope = rope_for(w, 16)
    outs, stats = fp_layer_pass(w.layers[0], x, rope, TINY, 2, want_stats=True)
    tr, fx = init_flat_params(w.layers[0], TINY, q, t, absmax=stats, generator=torch.Generator().manual_seed(0))
    cfg = replace(CFG, epochs=2)
    res = {c: train_layer(tr, fx, w.layers[0], x, outs, rope, TINY, q, t, replace(cfg, compile=c),
                          generator=torch.Generator(), amp=torch.float32) for c in ("off", "on")}
    assert res["on"][1] == pytest.approx(res["off"][1], rel=1e-4)
    for k in tr:
        torch.testing.assert_close(res["on"][0][k], res["off"][0][k], rtol=1e-4, atol=1e-5)


def test_layers_share_one_compiled_step(monkeypatch):
    """calibrate() compiles the gradient step once per model: later layers reuse it without recompiling."""
    import functools

    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    torch._dynamo.reset()
    w = tiny_model()
    cfg = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1, compile="on")
    calibrate(w, tokens(4, 16), bits_preset("w4a4kv4"), method_config("flatquant"), cfg)
    assert TINY.n_layers >= 2
    assert counter.frame_count == 1  # one graph for every layer (a per-layer guard failure would recompile)


def test_nan_layer_is_an_error_and_never_saved(tmp_path):
    """A layer whose calibration loss turns NaN stops the run with NonFiniteError naming it; its checkpoint is not
    written, the layers before it are."""
    from flatquant.calib.guard import NonFiniteError

    w = tiny_model(TINY)
    layers = list(w.layers)
    layers[1] = {**layers[1], "q_proj.weight": torch.full_like(layers[1]["q_proj.weight"], float("nan"))}
    w = dataclasses.replace(w, layers=tuple(layers))
    ccfg = CalibConfig(nsamples=2, seqlen=8, batch_size=2, epochs=1)
    with pytest.raises(NonFiniteError, match=r"^layer 1"):
        calibrate(w, tokens(2, 8), bits_preset("w4a4kv4"), method_config("flatquant"), ccfg, workdir=tmp_path)
    assert layer_ckpt(tmp_path, 0).exists() and not layer_ckpt(tmp_path, 1).exists()
