"""Work directories: atomic writes, damaged or foreign layer files recomputed, one run per --out."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from flatquant.calib import workdir as wd
from flatquant.calib.config import CalibConfig
from flatquant.calib.loop import calibrate
from flatquant.calib.methods import method_config
from flatquant.presets import bits_preset
from tests.helpers import tiny_model, tokens

CFG = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=2, lr=5e-3)
Q, T = bits_preset("w4a4kv4"), method_config("flatquant")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    wd.atomic_save_file({"a": torch.ones(3)}, path)

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(wd.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        wd.atomic_save_file({"a": torch.zeros(3)}, path)
    with pytest.raises(KeyboardInterrupt):
        wd.atomic_write_text(tmp_path / "r.json", "{}")
    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temporary files left


def test_damaged_and_foreign_layer_files_are_reported_and_recomputed(tmp_path, caplog):
    w, toks = tiny_model(), tokens(4, 16)
    full = calibrate(w, toks, Q, T, CFG, workdir=tmp_path)
    ck0, ck1 = wd.layer_ckpt(tmp_path, 0), wd.layer_ckpt(tmp_path, 1)
    ck1.write_bytes(ck1.read_bytes()[:100])  # a kill during a non-atomic write
    save_file({k: v + 1 for k, v in full[0].items()}, str(ck0), metadata={"fingerprint": "0" * 24})  # foreign
    with caplog.at_level(logging.WARNING, logger="flatquant.calib.workdir"):
        again = calibrate(w, toks, Q, T, CFG, workdir=tmp_path)
    assert _equal(full, again)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("\n" not in m for m in msgs)
    assert "another calibration" in msgs[0] and "layer_000" in msgs[0]
    assert "damaged" in msgs[1] and "layer_001" in msgs[1]
    assert wd.load_layer(ck1, json.loads((tmp_path / "calibration.json").read_text())["fingerprint"]) is not None


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, caplog):
    lock = tmp_path / wd.LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live process
    with pytest.raises(wd.WorkdirBusy, match=f"in use by another calibration \\(pid {os.getppid()}"):
        with wd.workdir_lock(tmp_path):
            pass
    lock.write_text(json.dumps({"pid": 1234, "host": "elsewhere"}))  # cannot be checked from here
    with pytest.raises(wd.WorkdirBusy, match="on host elsewhere"):
        with wd.workdir_lock(tmp_path):
            pass
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="flatquant.calib.workdir"):
        with wd.workdir_lock(tmp_path):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            with wd.workdir_lock(tmp_path):  # re-entrant
                pass
            assert lock.is_file()
    assert "stale lock" in caplog.text and "no longer runs" in caplog.text
    assert not lock.exists()  # released
    lock.write_text("")  # killed between creating and writing its lock, long ago
    os.utime(lock, (0, 0))
    with wd.workdir_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_cli_resumes_a_damaged_workdir_and_refuses_a_busy_one(tmp_path, capsys, caplog, monkeypatch):
    from flatquant.cli import main
    from flatquant.io import load_transforms
    from flatquant.models.args import ModelArgs
    from tests.test_cli import TEXT, make_tiny_hf_folder

    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    folder = make_tiny_hf_folder(tmp_path / "model")
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    argv = ["calibrate", "--model", str(folder), "--device", "cpu", "--data", str(data), "--nsamples", "4",
            "--seqlen", "16", "--epochs", "1", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "transforms.json").read_text())
    assert meta["calibration"] == {"world_size": 1, "layer_ranks": [0, 0], "layer_world_sizes": [1, 1],
                                   "resumed_layers": []}
    args = ModelArgs(**meta["model"])
    first = load_transforms(out, args)[0]
    ck = wd.layer_ckpt(out, 1)
    ck.write_bytes(ck.read_bytes()[:64])
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "damaged" in caplog.text
    assert _equal(first, load_transforms(out, args)[0])
    assert json.loads((out / "transforms.json").read_text())["calibration"]["resumed_layers"] == [0]
    (out / wd.LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "in use by another calibration" in err
