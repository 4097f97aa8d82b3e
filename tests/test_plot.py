"""Flatness figures: PNGs are written, and the plotted quantities are what the folded layer computes."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from flatquant import plot
from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate
from flatquant.core.kron import kron_transform
from flatquant.models.layer import rms_norm
from flatquant.models.model import embed
from flatquant.presets import bits_preset, method_config
from tests.helpers import TINY, tiny_model, tokens

pytest.importorskip("matplotlib")

Q = bits_preset("w4a4kv4")
CCFG = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1)


@pytest.fixture(scope="module")
def setup():
    w = tiny_model(outliers=3)
    toks = tokens(4, 16)
    flats, tcfgs = {}, {}
    for m in ("rtn", "smoothquant", "quarot", "flatquant"):
        tcfg = method_config(m)
        flats[m] = calibrate(w, toks, Q, tcfg, CCFG)
        tcfgs[m] = tcfg
    return w, toks, flats, tcfgs


def test_channel_magnitudes_sorted_max():
    x = torch.tensor([[1.0, -5.0, 2.0], [-3.0, 0.5, 1.0]])
    assert torch.equal(plot.channel_magnitudes(x), torch.tensor([5.0, 3.0, 2.0]))
    assert torch.allclose(plot.channel_magnitudes(x, reduce="l2"),
                          torch.tensor([5.0249, 3.1623, 2.2361]), atol=1e-4)


def test_hadamard_flattens_outlier_activations(setup):
    w, toks, flats, tcfgs = setup
    st = plot.flatness_stats(w, flats, tcfgs, Q, toks, [0, -1], sites=("qkv", "down"))
    for i in (0, 1):
        orig = plot.flatness_ratio(st["rtn"][i]["qkv"]["act"])
        had = plot.flatness_ratio(st["quarot"][i]["qkv"]["act"])
        # the outlier norm channels (20×) make the original input spiky; a rotation spreads them
        assert orig > 4.0 and had < 0.5 * orig, (i, orig, had)
    # layer 0's q/k/v input for QuaRot is exactly the rotated RMSNorm output: check the plotted curve
    x = embed(w, toks)
    h = rms_norm(x, w.layers[0]["input_norm"], TINY.rms_eps)
    f = flats["quarot"][0]
    want = kron_transform(h, f["ln_trans.left.m"], f["ln_trans.right.m"])
    assert torch.allclose(st["quarot"][0]["qkv"]["act"], plot.channel_magnitudes(want), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(st["quarot"][0]["qkv"]["act"], plot.channel_magnitudes(h), rtol=1e-2)
    # the original curve is the plain RMSNorm output and the plain weights
    assert torch.allclose(st["rtn"][0]["qkv"]["act"], plot.channel_magnitudes(h), rtol=1e-5, atol=1e-6)
    wq = torch.cat([w.layers[0][f"{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    assert torch.allclose(st["rtn"][0]["qkv"]["weight"], plot.channel_magnitudes(wq))


def test_mse_stats_rank_methods(setup):
    w, toks, flats, tcfgs = setup
    st = plot.mse_stats(w, flats, tcfgs, Q, toks)
    assert st["layer_out"]["rtn"].shape == (TINY.n_layers,) and st["token"]["rtn"].shape == (16,)
    for key in ("layer_out", "act"):
        assert (st[key]["quarot"] < st[key]["rtn"]).all(), key
        assert (st[key]["rtn"] > 0).all()
    fp = plot.mse_stats(w, {"rtn": flats["rtn"]}, {"rtn": tcfgs["rtn"]}, bits_preset("fp"), toks)
    assert float(fp["layer_out"]["rtn"].max()) < 1e-10  # no quantizer: the folded layer is the FP layer


def test_figures_are_written(setup, tmp_path):
    w, toks, flats, tcfgs = setup
    p1 = plot.flatness_figure(w, flats, tcfgs, Q, toks, [0, 1], tmp_path / "f1.png", sites=("qkv", "down"))
    p2 = plot.mse_figure(w, flats, tcfgs, Q, toks, tmp_path / "sub" / "f2.png")
    for p in (p1, p2):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_parser_and_layers():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    p = plot.add_parser(sub)
    a = ap.parse_args(["plot", "--out", "x", "--layers", "0,-1", "--nsamples", "2"])
    assert a.handler is plot.run and a.nsamples == 2
    assert plot.parse_layers(a.layers, 30) == [0, 29]
    assert plot.parse_layers("", 30) == [0, 15, 29]
    with pytest.raises(ValueError, match="out of range"):
        plot.parse_layers("30", 30)
    for action in p._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_run_on_hf_folder(tmp_path, caplog, monkeypatch):
    from tests.test_cli import TEXT, make_tiny_hf_folder

    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    folder = make_tiny_hf_folder(tmp_path / "m")
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    ap = argparse.ArgumentParser()
    plot.add_parser(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["plot", "--model", str(folder), "--data", str(data), "--nsamples", "2", "--seqlen", "16",
                       "--out", str(tmp_path / "out"), "--device", "cpu", "--layers", "1"])
    with caplog.at_level(logging.INFO, logger="flatquant.plot"):
        assert plot.run(a) == 0
    assert (tmp_path / "out" / "flatness.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "mse.png").stat().st_size > 10_000
