"""Flatness figures: PNGs are written, and the plotted quantities are what the folded layer computes."""

from __future__ import annotations

import logging

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate
from flatquant.calib.methods import method_config
from flatquant.core.kron import kron_transform
from flatquant.core.norm import rms_norm
from flatquant.evaluation import plots
from flatquant.models.model import embed
from flatquant.presets import bits_preset
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
    assert torch.equal(plots.channel_magnitudes(x), torch.tensor([5.0, 3.0, 2.0]))
    assert torch.allclose(plots.channel_magnitudes(x, reduce="l2"),
                          torch.tensor([5.0249, 3.1623, 2.2361]), atol=1e-4)


def test_hadamard_flattens_outlier_activations(setup):
    w, toks, flats, tcfgs = setup
    st = plots.flatness_stats(w, flats, tcfgs, Q, toks, [0, -1], sites=("qkv", "down"))
    for i in (0, 1):
        orig = plots.flatness_ratio(st["rtn"][i]["qkv"]["act"])
        had = plots.flatness_ratio(st["quarot"][i]["qkv"]["act"])
        # the outlier norm channels (20×) make the original input spiky; a rotation spreads them
        assert orig > 4.0 and had < 0.5 * orig, (i, orig, had)
    # layer 0's q/k/v input for QuaRot is exactly the rotated RMSNorm output: check the plotted curve
    x = embed(w, toks)
    h = rms_norm(x, w.layers[0]["input_norm"], TINY.rms_eps)
    f = flats["quarot"][0]
    want = kron_transform(h, f["ln_trans.left.m"], f["ln_trans.right.m"])
    assert torch.allclose(st["quarot"][0]["qkv"]["act"], plots.channel_magnitudes(want), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(st["quarot"][0]["qkv"]["act"], plots.channel_magnitudes(h), rtol=1e-2)
    # the original curve is the plain RMSNorm output and the plain weights
    assert torch.allclose(st["rtn"][0]["qkv"]["act"], plots.channel_magnitudes(h), rtol=1e-5, atol=1e-6)
    wq = torch.cat([w.layers[0][f"{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
    assert torch.allclose(st["rtn"][0]["qkv"]["weight"], plots.channel_magnitudes(wq))


def test_mse_stats_rank_methods(setup):
    w, toks, flats, tcfgs = setup
    st = plots.mse_stats(w, flats, tcfgs, Q, toks)
    assert st["layer_out"]["rtn"].shape == (TINY.n_layers,) and st["token"]["rtn"].shape == (16,)
    for key in ("layer_out", "act"):
        assert (st[key]["quarot"] < st[key]["rtn"]).all(), key
        assert (st[key]["rtn"] > 0).all()
    fp = plots.mse_stats(w, {"rtn": flats["rtn"]}, {"rtn": tcfgs["rtn"]}, bits_preset("fp"), toks)
    assert float(fp["layer_out"]["rtn"].max()) < 1e-10  # no quantizer: the folded layer is the FP layer


def test_figures_are_written(setup, tmp_path):
    w, toks, flats, tcfgs = setup
    p1 = plots.flatness_figure(w, flats, tcfgs, Q, toks, [0, 1], tmp_path / "f1.png", sites=("qkv", "down"))
    p2 = plots.mse_figure(w, flats, tcfgs, Q, toks, tmp_path / "sub" / "f2.png")
    for p in (p1, p2):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_parse_layers():
    assert plots.parse_layers("0,-1", 30) == [0, 29]
    assert plots.parse_layers("", 30) == [0, 15, 29]
    assert plots.parse_layers(" ", 2) == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        plots.parse_layers("30", 30)
    with pytest.raises(ValueError, match="out of range"):
        plots.parse_layers("-31", 30)


def test_module_has_no_command_line():
    """The ``plot`` command line lives in :mod:`flatquant.cli` only."""
    import inspect

    assert "argparse" not in inspect.getsource(plots)
    assert not hasattr(plots, "add_parser") and not hasattr(plots, "run")


def test_write_figures_without_flatquant(setup, tmp_path, caplog):
    w, toks, _, _ = setup
    with caplog.at_level(logging.INFO, logger="flatquant.evaluation.plots"):
        paths = plots.write_figures(w, toks, toks, Q, tmp_path / "out", layers=[1], name="tiny")
    assert paths == (tmp_path / "out" / "flatness.png", tmp_path / "out" / "mse.png")
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "flatquant" not in caplog.text.split("geometric mean", 1)[1].split("\n", 1)[0]
