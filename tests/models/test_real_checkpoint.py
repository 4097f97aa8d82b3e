"""Real checkpoints: export → load round trip, real path == fake path, compact top-level tensors, refusal of bad,
edited or old checkpoints, atomic re-export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import flatquant.models.real.checkpoint as export_mod
from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate, reparameterize
from flatquant.calib.methods import method_config
from flatquant.core.quant import fake_quant
from flatquant.models.flat import fold_layer
from flatquant.models.model import forward
from flatquant.models.real.checkpoint import (
    CheckpointError,
    config_checksum,
    declared_dtype,
    dequantize_rows,
    export_checkpoint,
    load_checkpoint,
    load_tensors,
    load_tokenizer,
    quantize_rows_int8,
    read_config,
)
from flatquant.ops import unpack_int4
from flatquant.presets import bits_preset
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
    assert flatquant.export_checkpoint is export_checkpoint  # the format lives in models/real; the name stays public


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


def _config(ck: Path) -> dict:
    return json.loads((ck / "flatquant_config.json").read_text())


def _resign(ck: Path, meta: dict) -> None:
    """Write an edited config with a matching checksum (to reach the checks behind the checksum)."""
    meta = {**meta, "config_sha256": config_checksum(meta)}
    (ck / "flatquant_config.json").write_text(json.dumps(meta))


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
    _resign(ck, meta)
    with pytest.raises(CheckpointError, match="does not match its architecture"):
        load_checkpoint(ck)
    meta["model"]["arch"] = "gpt2"
    _resign(ck, meta)
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


def _tied(w):
    """The same model with its LM head replaced by the embedding (one tensor), as HF's tied models are."""
    return dataclasses.replace(w, top={**w.top, "lm_head": w.top["embed"]})


def _top_bytes(ck: Path) -> int:
    _, t = load_tensors(ck)
    return sum(v.numel() * v.element_size() for k, v in t.items() if k.startswith("top."))


def test_declared_dtype() -> None:
    w = tiny_model()
    assert declared_dtype(w) == torch.bfloat16  # fp32-loaded, nothing declared: bf16
    assert declared_dtype(w.to(dtype=torch.float16)) == torch.float16
    assert declared_dtype(dataclasses.replace(w, meta={"dtype": "float16"})) == torch.float16
    assert declared_dtype(dataclasses.replace(w, meta={"dtype": "torch.float32"})) == torch.float32


def test_tied_embedding_stored_once_in_model_dtype(exported, tmp_path: Path) -> None:
    w, flats, _ = exported
    tied = _tied(w)
    assert not tied.args.tie_embeddings  # detected from the tensors, not only from the config flag
    export_checkpoint(tied, flats, W4A4KV4, FLATQUANT, tmp_path / "fp32")
    export_checkpoint(tied, flats, W4A4KV4, FLATQUANT, tmp_path / "bf16", dtype=torch.bfloat16)
    meta, t = load_tensors(tmp_path / "bf16")
    assert meta["tied"] and meta["dtype"] == "bfloat16" and meta["embed_bits"] is None
    assert "top.lm_head" not in t and t["top.embed"].dtype == torch.bfloat16
    assert t["top.final_norm"].dtype == t["layers.0.input_norm"].dtype == torch.float32  # norms: fp32 always
    v, h = TINY.vocab_size, TINY.hidden
    assert _top_bytes(tmp_path / "bf16") == v * h * 2 + h * 4 + TINY.head_dim // 2 * 4
    assert _top_bytes(tmp_path / "fp32") == v * h * 4 + h * 4 + TINY.head_dim // 2 * 4
    model = load_checkpoint(tmp_path / "bf16")
    assert model.cfg.dtype == torch.float32  # CPU computes in fp32 by default
    assert model.weights.top["lm_head"] is model.weights.top["embed"]
    torch.testing.assert_close(model.weights.top["embed"], w.top["embed"].bfloat16().float(), rtol=0, atol=0)
    assert torch.isfinite(model(tokens(2, 10, seed=3))).all()


def test_int8_rows_round_trip() -> None:
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 40)[:, None]
    w[3] = 0
    codes, scale = quantize_rows_int8(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
    assert codes.abs().amax(1)[torch.arange(40) != 3].eq(127).all()
    err = (dequantize_rows(codes, scale, torch.float64) - w.double()).abs()
    assert (err <= scale.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert dequantize_rows(codes, scale, torch.float32)[3].eq(0).all()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_int8_embedding_option(exported, tie: bool, tmp_path: Path) -> None:
    w, flats, _ = exported
    w = _tied(w) if tie else w
    export_checkpoint(w, flats, W4A4KV4, FLATQUANT, tmp_path / "ck", embed_bits=8)
    meta, t = load_tensors(tmp_path / "ck")
    assert meta["embed_bits"] == 8 and meta["tied"] == tie
    names = {k for k in t if k.startswith(("top.embed", "top.lm_head"))}
    want = {"top.embed.qweight", "top.embed.scale"} | (set() if tie else {"top.lm_head.qweight", "top.lm_head.scale"})
    assert names == want and t["top.embed.qweight"].dtype == torch.int8
    model = load_checkpoint(tmp_path / "ck")
    for name in ("embed", "lm_head"):
        src = "embed" if tie else name
        deq = dequantize_rows(t[f"top.{src}.qweight"], t[f"top.{src}.scale"], torch.float32)
        torch.testing.assert_close(model.weights.top[name], deq, rtol=0, atol=0)
        torch.testing.assert_close(deq, w.top[name], rtol=0, atol=float(t[f"top.{src}.scale"].max()) / 2 * 1.001)
    with pytest.raises(CheckpointError, match="embed_bits must be"):
        export_checkpoint(w, flats, W4A4KV4, FLATQUANT, tmp_path / "bad", embed_bits=4)
    assert not (tmp_path / "bad").exists()


def test_version_1_refused_in_one_line(exported, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    meta = _config(ck)
    meta["format_version"] = 1
    for k in ("config_sha256", "tied", "embed_bits", "tokenizer_files"):
        meta.pop(k)
    (ck / "flatquant_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"format v1, this flatquant reads v2 only; re-export") as e:
        load_checkpoint(ck)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit", [
    lambda m: m["quant"]["a"].update(bits=8),
    lambda m: m["quant"]["k"].update(bits=8),
    lambda m: m["model"].update(rms_eps=1e-3),
    lambda m: m.update(rope_scaling=2.0),
    lambda m: m.update(dtype="float16"),
    lambda m: m.update(tied=not m["tied"]),
    lambda m: m["shards"][0].update(sha256="0" * 64),
], ids=["a_bits", "kv_bits", "rms_eps", "rope_scaling", "dtype", "tied", "shard_sha"])
def test_edited_config_refused(exported, edit, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    assert load_checkpoint(ck) is not None
    meta = _config(ck)
    edit(meta)
    (ck / "flatquant_config.json").write_text(json.dumps(meta, indent=1))
    with pytest.raises(CheckpointError, match="config checksum mismatch .*re-export"):
        load_checkpoint(ck)


@pytest.mark.parametrize("key", ["shards", "placement", "weight_map", "config_sha256", "embed_bits"])
def test_incomplete_config_one_line(exported, key: str, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    meta = _config(ck)
    del meta[key]
    if key == "config_sha256":
        (ck / "flatquant_config.json").write_text(json.dumps(meta))
    else:
        _resign(ck, meta)
    with pytest.raises(CheckpointError, match=f"lacks \\['{key}'\\]\\); re-export") as e:
        read_config(ck)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(shards=[]),
    lambda m: m["shards"][0].update(file="../elsewhere.safetensors"),
    lambda m: m.update(placement={"description": "no list"}),
    lambda m: m.update(embed_bits=4),
    lambda m: m.update(rope_scaling="1.0"),
], ids=["no_shards", "shard_path", "placement", "embed_bits", "rope_type"])
def test_malformed_config_one_line(exported, edit, tmp_path: Path) -> None:
    ck = _copy(exported[2], tmp_path / "ck")
    meta = _config(ck)
    edit(meta)
    _resign(ck, meta)
    with pytest.raises(CheckpointError, match="incomplete or damaged checkpoint config .*invalid"):
        read_config(ck)


class _Tok:
    """Stands in for a tokenizer: ``save_pretrained`` writes two files."""

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer.json").write_text('{"vocab": {}}')
        (Path(folder) / "special_tokens_map.json").write_text("{}")


def test_tokenizer_files_checksummed(exported, tmp_path: Path) -> None:
    w, flats, _ = exported
    export_checkpoint(w, flats, W4A4KV4, FLATQUANT, tmp_path / "ck", tokenizer=_Tok())
    assert sorted(f["file"] for f in _config(tmp_path / "ck")["tokenizer_files"]) == [
        "tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json"]
    (tmp_path / "ck" / "tokenizer" / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    with pytest.raises(CheckpointError, match="tokenizer.json: .*(truncated|sha256)"):
        load_tokenizer(tmp_path / "ck")


def _siblings(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.parent.iterdir() if p.name != ck.name and p.name.startswith(f".{ck.name}."))


def test_interrupted_reexport_keeps_old_checkpoint(exported, monkeypatch, tmp_path: Path) -> None:
    w, flats, src = exported
    ck = _copy(src, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()}
    x = tokens(1, 8, seed=5)
    want = load_checkpoint(ck)(x)
    real_export_layer = export_mod.export_layer
    seen = []

    def dies_on_layer_1(folded, qcfg, **kw):
        seen.append(1)
        if len(seen) == 2:  # mid-export, as a kill would find it: the old checkpoint still loads
            assert _siblings(ck) and torch.equal(load_checkpoint(ck)(x), want)
            raise KeyboardInterrupt
        return real_export_layer(folded, qcfg, **kw)

    monkeypatch.setattr(export_mod, "export_layer", dies_on_layer_1)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(w, flats, W4A4KV4, FLATQUANT, ck, embed_bits=8)
    assert len(seen) == 2
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.is_file()} == before
    assert torch.equal(load_checkpoint(ck)(x), want) and _siblings(ck) == []


def test_reexport_replaces_and_cleans_up(exported, tmp_path: Path) -> None:
    w, flats, src = exported
    ck = _copy(src, tmp_path / "ck")
    dead = tmp_path / ".ck.partial-999999999-deadbeef"  # left by a killed export (no such process)
    dead.mkdir()
    (dead / "model-00001.safetensors").write_bytes(b"partial")
    export_checkpoint(w, flats, W4A4KV4, FLATQUANT, ck, embed_bits=8)
    assert read_config(ck)["embed_bits"] == 8 and len(read_config(ck)["shards"]) == 1
    assert sorted(p.name for p in ck.iterdir()) == ["flatquant_config.json", "model-00001.safetensors"]
    assert _siblings(ck) == []
    load_checkpoint(ck)


def test_exchange_swaps_folders_or_touches_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    swapped = export_mod._exchange(a, b)
    assert ((a / "x").read_text(), (b / "x").read_text()) == (("b", "a") if swapped else ("a", "b"))


def test_refuses_to_replace_other_folder(exported, tmp_path: Path) -> None:
    w, flats, _ = exported
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"refusing to replace .*notes\.txt"):
        export_checkpoint(w, flats, W4A4KV4, FLATQUANT, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_export_into_new_nested_folder(exported, tmp_path: Path) -> None:
    w, flats, _ = exported
    out = tmp_path / "a" / "b"
    path = export_checkpoint(w, flats, W4A4KV4, FLATQUANT, out)
    assert path == out.absolute() / "flatquant_config.json" and os.listdir(tmp_path / "a") == ["b"]


def test_cli_export_embed_bits_and_auto_dtype(exported, monkeypatch, tmp_path: Path) -> None:
    from flatquant import cli

    w, flats, _ = exported
    monkeypatch.setattr(cli, "_load_for_transforms", lambda transforms, model: (w, None))
    monkeypatch.setattr(cli, "load_transforms", lambda transforms, args: (flats, W4A4KV4, FLATQUANT, {}))
    assert cli.main(["export", "--transforms", str(tmp_path), "--out", str(tmp_path / "ck"), "--embed-bits", "8"]) == 0
    meta = read_config(tmp_path / "ck")
    assert meta["embed_bits"] == 8 and meta["dtype"] == "bfloat16"  # fp32 weights, nothing declared: bf16


@pytest.mark.parametrize("edit", [lambda m: m.pop("shards"), lambda m: m["quant"]["v"].update(bits=8)],
                         ids=["no_shards", "v_bits"])
def test_cli_bad_config_one_line(exported, edit, capsys, tmp_path: Path) -> None:
    from flatquant import cli

    ck = _copy(exported[2], tmp_path / "ck")
    meta = _config(ck)
    edit(meta)
    (ck / "flatquant_config.json").write_text(json.dumps(meta))
    assert cli.main(["generate", "--checkpoint", str(ck), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flatquant: error: ") and "re-export" in err and "\n" not in err
