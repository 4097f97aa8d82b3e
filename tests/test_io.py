from __future__ import annotations

import pytest
import torch

from flatquant.api import from_transforms, quantize_model
from flatquant.calib.config import CalibConfig
from flatquant.io import TransformFileError, load_transforms, save_transforms
from flatquant.models.model import forward
from flatquant.presets import bits_preset
from tests.helpers import TINY, TINY_QWEN, tiny_model, tokens


def test_save_load_gives_identical_logits(tmp_path):
    w = tiny_model()
    q = bits_preset("w4a4kv4")
    cc = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1)
    qm = quantize_model(w, method="flatquant", qcfg=q, ccfg=cc, calib_tokens=tokens(4, 16))
    save_transforms(tmp_path, qm.flats, args=w.args, qcfg=q, tcfg=qm.tcfg, ccfg=cc, method="flatquant")
    flats, q2, t2, meta = load_transforms(tmp_path, w.args)
    assert q2 == q and t2 == qm.tcfg and meta["method"] == "flatquant"
    re = from_transforms(w, flats, q2, t2, "flatquant")
    t = tokens(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(forward(qm.weights, t, q), forward(re.weights, t, q2))


def test_other_model_is_refused(tmp_path):
    w = tiny_model()
    qm = quantize_model(w, method="quarot", qcfg=bits_preset("w4a4kv4"), ccfg=CalibConfig(), calib_tokens=None)
    save_transforms(tmp_path, qm.flats, args=w.args, qcfg=qm.qcfg, tcfg=qm.tcfg, ccfg=None, method="quarot")
    with pytest.raises(TransformFileError, match="another model.*arch=llama"):
        load_transforms(tmp_path, TINY_QWEN)
    with pytest.raises(TransformFileError, match="no transforms.json"):
        load_transforms(tmp_path / "missing", TINY)
    (tmp_path / "transforms.json").write_text("{")
    with pytest.raises(TransformFileError, match="not valid JSON"):
        load_transforms(tmp_path, TINY)


def _quarot_files(tmp_path):
    w = tiny_model()
    qm = quantize_model(w, method="quarot", qcfg=bits_preset("w4a4kv4"), ccfg=CalibConfig(), calib_tokens=None)
    save_transforms(tmp_path, qm.flats, args=w.args, qcfg=qm.qcfg, tcfg=qm.tcfg, ccfg=None, method="quarot")
    return w, qm


def test_damaged_or_nonfinite_transforms_are_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    w, _ = _quarot_files(tmp_path)
    path = tmp_path / "transforms.safetensors"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TransformFileError, match="damaged or truncated"):
        load_transforms(tmp_path, w.args)
    path.write_bytes(good)
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "flatquant-transforms"})
    with pytest.raises(TransformFileError, match="NaN/inf"):
        load_transforms(tmp_path, w.args)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save killed while writing the tensors leaves the previous pair loadable and no partial file."""
    w, qm = _quarot_files(tmp_path)
    before = (tmp_path / "transforms.safetensors").read_bytes()
    import safetensors.torch

    def dies(tensors, filename, metadata=None):  # a kill in the middle of writing: a partial file, then death
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    monkeypatch.setattr("flatquant.calib.workdir.save_file", dies, raising=False)
    monkeypatch.setattr("flatquant.io.save_file", dies, raising=False)  # any direct writer too
    with pytest.raises(KeyboardInterrupt):
        save_transforms(tmp_path, qm.flats, args=w.args, qcfg=qm.qcfg, tcfg=qm.tcfg, ccfg=None, method="quarot")
    assert (tmp_path / "transforms.safetensors").read_bytes() == before
    load_transforms(tmp_path, w.args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transforms.json", "transforms.safetensors"]
