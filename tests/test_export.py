"""Real checkpoints: export → load round trip, real path == fake path, refusal of bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate, reparameterize
from flatquant.core.quant import fake_quant
from flatquant.export import CheckpointError, export_checkpoint, load_checkpoint, load_tensors, read_config
from flatquant.models.flat import fold_layer
from flatquant.models.model import forward
from flatquant.ops import unpack_int4
from flatquant.presets import bits_preset, method_config
from tests.helpers import TINY, TINY_QWEN, tiny_model, tokens

W4A4KV4 = bits_preset("w4a4kv4")
FLATQUANT = method_config("flatquant")
CFG = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=1)


def _calibrated(args=TINY):
    w = tiny_model(args)
    return w, calibrate(w, tokens(4, 16), W4A4KV4, FLATQUANT, CFG)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple:
    w, flats = _calibrated()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    export_checkpoint(w, flats, W4A4KV4, FLATQUANT, out, shard_bytes=40_000)
    return w, flats, out


def test_sharded_with_checksums(exported) -> None:
    _, _, out = exported
    meta = read_config(out)
    assert len(meta["shards"]) > 1 and all(len(s["sha256"]) == 64 for s in meta["shards"])
    assert meta["backend"] == "real" and meta["dtype"] == "float32"
    assert "ln_trans.left" in meta["placement"]["online_transforms"]
    _, t = load_tensors(out)
    assert t["layers.0.q_proj.qweight"].dtype == torch.uint8
    assert t["layers.0.q_proj.qweight"].shape == (TINY.q_dim, TINY.hidden // 2)


def test_round_trip_identical_logits(exported) -> None:
    _, _, out = exported
    x = tokens(2, 12, seed=4)
    assert torch.equal(load_checkpoint(out)(x), load_checkpoint(out)(x))


def test_public_load_entry_point(exported) -> None:
    import flatquant

    _, _, out = exported
    x = tokens(1, 8, seed=6)
    assert torch.equal(flatquant.load(out)(x), load_checkpoint(out)(x))


def test_codes_reproduce_fake_weights(exported) -> None:
    w, flats, out = exported
    fake = reparameterize(w, flats, W4A4KV4, FLATQUANT)
    _, t = load_tensors(out)
    for n in ("q_proj", "down_proj"):
        deq = unpack_int4(t[f"layers.1.{n}.qweight"]).float() * t[f"layers.1.{n}.w_scale"][:, None]
        torch.testing.assert_close(deq, fake.layers[1][f"{n}.weight"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("args", [TINY, TINY_QWEN], ids=["llama", "qwen2"])
def test_real_logits_match_fake(args, tmp_path: Path) -> None:
    w, flats = _calibrated(args)
    export_checkpoint(w, flats, W4A4KV4, FLATQUANT, tmp_path / "ck")
    x = tokens(2, 16, seed=7)
    want = forward(reparameterize(w, flats, W4A4KV4, FLATQUANT), x, W4A4KV4)
    got = load_checkpoint(tmp_path / "ck")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,backend", [("w4a8kv4", "real"), ("w8a8", "real"), ("w4a16", "fake")])
def test_other_bit_settings_prefill_and_decode(preset: str, backend: str, tmp_path: Path) -> None:
    w = tiny_model()
    q = bits_preset(preset)
    flats = calibrate(w, tokens(4, 16), q, FLATQUANT, CFG)
    export_checkpoint(w, flats, q, FLATQUANT, tmp_path / "ck")
    assert read_config(tmp_path / "ck")["backend"] == backend
    x = tokens(2, 10, seed=2)
    want = forward(reparameterize(w, flats, q, FLATQUANT), x, q)
    model = load_checkpoint(tmp_path / "ck")
    cache = model.new_cache(2, 10)
    got = torch.cat([model(x[:, :6], cache)] + [model(x[:, i:i + 1], cache) for i in range(6, 10)], 1)
    # the real path transforms activations in another summation order: a code at a rounding tie can flip
    # (8-bit grids have 16× more ties than 4-bit ones), moving a few logits by ~1e-5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_truncated_shard(exported, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    shard = ck / read_config(ck)["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(ck)


def test_refuses_tampered_tensor(exported, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    shard = ck / read_config(ck)["shards"][-1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(ck)


def test_refuses_other_architecture(exported, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_checkpoint(ck, expect=TINY_QWEN)
    meta = json.loads((ck / "flatquant_config.json").read_text())
    meta["model"]["hidden"] = 64
    (ck / "flatquant_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its architecture"):
        load_checkpoint(ck)
    meta["model"]["arch"] = "gpt2"
    (ck / "flatquant_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unsupported"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="not a flatquant checkpoint"):
        load_checkpoint(tmp_path)


def test_rtn_codes_equal_fold_grid() -> None:
    w, flats = _calibrated()
    f64 = {k: v.double() for k, v in w.layers[0].items()}
    folded = fold_layer({k: v.double() for k, v in flats[0].items()}, f64, TINY, W4A4KV4, "svd",
                        quantize_weights=False)
    direct = fold_layer({k: v.double() for k, v in flats[0].items()}, f64, TINY, W4A4KV4, "svd")
    torch.testing.assert_close(fake_quant(folded["o_proj.weight"], W4A4KV4.w), direct["o_proj.weight"])
