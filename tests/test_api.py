"""The library pipeline: methods by name or as :class:`Method` values, the unquantized baseline, and the
global-transform slot refused before any calibration."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flatquant.api import quantize_model
from flatquant.calib.config import CalibConfig
from flatquant.calib.methods import METHODS, GlobalTransform
from flatquant.core.spec import QuantConfig
from flatquant.presets import bits_preset
from tests.helpers import tiny_model

Q = bits_preset("w4a4kv4")


def test_fp_returns_the_model_unchanged():
    w = tiny_model()
    qm = quantize_model(w, method="fp", qcfg=Q, ccfg=CalibConfig(), calib_tokens=None)
    assert qm.weights is w and qm.flats == [] and qm.qcfg == QuantConfig() and qm.method == "fp"
    assert qm.tcfg == METHODS["rtn"].layer


def test_a_method_value_runs_like_its_registered_twin():
    w = tiny_model()
    mine = replace(METHODS["quarot"], name="my-quarot")
    a = quantize_model(w, method=mine, qcfg=Q, ccfg=CalibConfig(), calib_tokens=None)
    b = quantize_model(w, method="quarot", qcfg=Q, ccfg=CalibConfig(), calib_tokens=None)
    assert a.method == "my-quarot" and b.method == "quarot" and a.tcfg == b.tcfg
    for fa, fb in zip(a.flats, b.flats, strict=True):
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_unknown_names_and_labels():
    w = tiny_model()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        quantize_model(w, method="nope", qcfg=Q, ccfg=CalibConfig(), calib_tokens=None)
    qm = quantize_model(w, method="nope", qcfg=Q, ccfg=CalibConfig(), calib_tokens=None, tcfg=METHODS["rtn"].layer)
    assert qm.method == "nope" and len(qm.flats) == w.args.n_layers


def test_data_methods_without_data_are_refused():
    with pytest.raises(ValueError, match="calibration data"):
        quantize_model(tiny_model(), method="smoothquant", qcfg=Q, ccfg=CalibConfig(), calib_tokens=None)


def test_global_transform_is_a_slot_only():
    spin = replace(METHODS["quarot"], name="spin", global_transform=GlobalTransform(kind="hadamard"))
    with pytest.raises(NotImplementedError, match="apply_global_transform"):
        quantize_model(tiny_model(), method=spin, qcfg=Q, ccfg=CalibConfig(), calib_tokens=None)
