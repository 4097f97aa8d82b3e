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
