"""The method registry: its entries, the one data rule (and that calibration obeys it), what each method trains
(checked against the parameters calibration actually trains), where parts fold, and the global-transform slot."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate
from flatquant.calib.methods import (
    DEFAULT_METHOD,
    METHODS,
    UNQUANTIZED,
    GlobalTransform,
    Method,
    apply_global_transform,
    get_method,
    method_config,
    method_names,
    needs_data,
)
from flatquant.core.spec import TransformConfig
from flatquant.models.flat import init_flat_params, site_dim
from flatquant.models.sites import KRON_SITES, SITES
from flatquant.presets import bits_preset
from tests.helpers import TINY, tiny_model

Q = bits_preset("w4a4kv4")


def test_registry_names_order_and_read_only():
    assert tuple(METHODS) == ("fp", "rtn", "smoothquant", "quarot", "flatquant")
    assert all(name == m.name for name, m in METHODS.items())
    assert DEFAULT_METHOD in METHODS and not METHODS[UNQUANTIZED].quantize
    with pytest.raises(TypeError):
        METHODS["new"] = METHODS["rtn"]  # type: ignore[index]


def test_which_methods_need_data():
    assert {n: m.needs_data for n, m in METHODS.items()} == {
        "fp": False, "rtn": False, "smoothquant": True, "quarot": False, "flatquant": True}
    assert method_names(data_free=True) == ("fp", "rtn", "quarot")
    assert method_names(quantize=True) == ("rtn", "smoothquant", "quarot", "flatquant")
    assert method_names(quantize=True, data_free=False) == ("smoothquant", "flatquant")


@pytest.mark.parametrize(("tcfg", "want"), [
    (TransformConfig(kind="none", add_diag=False, lwc=False, lac=False, trainable=False), False),
    (TransformConfig(kind="hadamard", add_diag=True, diag_init="ones", lwc=False, lac=False, trainable=False), False),
    (TransformConfig(kind="hadamard", add_diag=True, diag_init="smoothquant", lwc=False, lac=False,
                     trainable=False), True),
    (TransformConfig(kind="hadamard", add_diag=False, lwc=True, lac=False, trainable=False), True),
    (TransformConfig(kind="hadamard", add_diag=False, lwc=False, lac=True, trainable=False), True),
    (TransformConfig(kind="svd", add_diag=False, lwc=False, lac=False, trainable=True), True),
])
def test_the_data_rule(tcfg, want):
    assert needs_data(tcfg) is want


@pytest.mark.parametrize("name", method_names(quantize=True))
def test_calibration_obeys_the_registry_on_data(name):
    m = METHODS[name]
    ccfg = CalibConfig(nsamples=2, seqlen=8, batch_size=2, epochs=0)
    if m.needs_data:
        with pytest.raises(ValueError, match="calibration data"):
            calibrate(tiny_model(), None, Q, m.layer, ccfg)
    else:
        assert len(calibrate(tiny_model(), None, Q, m.layer, ccfg)) == TINY.n_layers


def _part(key: str) -> str:
    parts = key.split(".")
    return "lwc" if "lwc" in parts else "lac" if "lac" in parts else "diag" if parts[-1] == "diag" else "transforms"


@pytest.mark.parametrize("name", tuple(METHODS))
def test_trained_parts_are_what_calibration_trains(name):
    m = METHODS[name]
    w = tiny_model()
    absmax = {s: torch.ones(site_dim(s, TINY)) for s in KRON_SITES}
    trainable, _ = init_flat_params(w.layers[0], TINY, Q, m.layer, absmax=absmax,
                                    generator=torch.Generator().manual_seed(0))
    if m.quantize:
        assert {_part(k) for k in trainable} == set(m.trained)
    assert m.trained == (("transforms", "diag", "lwc", "lac") if name == "flatquant" else ())


def test_site_kinds_and_folds():
    every = {s.transform for s in SITES} | {"k_trans", "v_trans"}
    assert METHODS["quarot"].site_kinds == dict.fromkeys(every, "hadamard")
    assert METHODS["flatquant"].site_kinds == dict.fromkeys(every, "svd")
    assert METHODS["rtn"].site_kinds == {} and METHODS["smoothquant"].site_kinds == {}
    assert set(METHODS["flatquant"].folds) == {"diag", "transforms", "lwc", "lac"}
    assert set(METHODS["smoothquant"].folds) == {"diag"} and "input_norm" in METHODS["smoothquant"].folds["diag"]
    assert set(METHODS["quarot"].folds) == {"transforms"}
    assert METHODS["fp"].folds == {} and METHODS["rtn"].folds == {}


def test_lookups():
    assert get_method("quarot") is METHODS["quarot"]
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of fp, rtn"):
        get_method("nope")
    assert method_config("flatquant") is METHODS["flatquant"].layer
    assert method_config("flatquant", diag_init="ones") == replace(METHODS["flatquant"].layer, diag_init="ones")
    with pytest.raises(ValueError, match="unknown method"):
        method_config("nope")


def test_method_validation():
    layer = METHODS["quarot"].layer
    with pytest.raises(ValueError, match="method name"):
        Method(name="", summary="x", layer=layer)
    with pytest.raises(ValueError, match="method name"):
        Method(name="a b", summary="x", layer=layer)
    with pytest.raises(ValueError, match="TransformConfig"):
        Method(name="x", summary="x", layer="quarot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantizes nothing"):
        Method(name="x", summary="x", layer=layer, quantize=False)
    with pytest.raises(ValueError, match="GlobalTransform"):
        Method(name="x", summary="x", layer=layer, global_transform="hadamard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        GlobalTransform(kind="random")  # type: ignore[arg-type]


def test_global_transform_slot():
    w = tiny_model()
    assert all(m.global_transform is None for m in METHODS.values())
    assert apply_global_transform(w, METHODS["flatquant"]) is w and apply_global_transform(w, None) is w
    spin = Method(name="spin-hadamard", summary="x", layer=METHODS["quarot"].layer,
                  global_transform=GlobalTransform(kind="hadamard"))
    assert not spin.needs_data and "global" in spin.folds
    assert replace(spin, global_transform=GlobalTransform(kind="learned")).needs_data
    with pytest.raises(NotImplementedError, match="spin-hadamard"):
        apply_global_transform(w, spin)
