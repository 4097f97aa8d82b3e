"""Layer-parallel calibration: 2 gloo processes on CPU give bit-identical transforms to 1, resumable either way."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.distributed import FP_PASS_COST, _block_cost, assign_layers, calibrate_parallel, launch_cpu
from flatquant.calib.loop import calibrate
from flatquant.calib.methods import method_config
from flatquant.presets import bits_preset
from tests.helpers import TINY, tiny_model, tokens

CFG = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=2, lr=5e-3)
Q = bits_preset("w4a4kv4")
ARGS3 = replace(TINY, n_layers=3)  # an odd layer count: blocks of 2 and 1


def _model():
    return tiny_model(ARGS3)


def _run_rank(workdir: str | None):
    return calibrate_parallel(_model(), tokens(4, 16), Q, method_config("flatquant"), CFG, device="cpu",
                              workdir=workdir)


def _assert_identical(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for k in x:
            assert torch.equal(x[k], y[k]), f"layer {i} {k}"


def test_assign_layers_gives_contiguous_balanced_blocks():
    assert assign_layers(range(5), 2) == [[0, 1, 2], [3, 4]]
    assert assign_layers([1, 4, 6], 2) == [[1, 4], [6]]
    assert assign_layers([0], 3) == [[0], [], []]
    assert [len(b) for b in assign_layers(range(80), 8, fp_cost=0.0)] == [10] * 8
    blocks = assign_layers(range(80), 8)  # later ranks pay FP forwards through the earlier layers
    assert sum(blocks, []) == list(range(80)) and [len(b) for b in blocks] == [14, 13, 11, 10, 9, 8, 8, 7]
    equal_last = _block_cost(list(range(70, 80)), FP_PASS_COST)  # 8 blocks of 10: the last takes 17 layer-times
    assert max(_block_cost(b, FP_PASS_COST) for b in blocks) < 14.6 < equal_last
    with pytest.raises(ValueError, match="at least 1"):
        assign_layers([0], 0)


def test_two_processes_are_bit_identical_to_one_and_resume_with_another_world_size(tmp_path):
    single = calibrate(_model(), tokens(4, 16), Q, method_config("flatquant"), CFG)
    ranks = launch_cpu(_run_rank, 2, str(tmp_path / "a"), threads=1)
    for flats, prov in ranks:
        _assert_identical(single, flats)
        assert prov == {"world_size": 2, "layer_ranks": [0, 0, 1], "layer_world_sizes": [2, 2, 2],
                        "resumed_layers": []}
    # resume the 2-process work directory with 1 process after losing layer 1
    (tmp_path / "a" / "layers" / "layer_001.safetensors").unlink()
    flats, prov = calibrate_parallel(_model(), tokens(4, 16), Q, method_config("flatquant"), CFG, device="cpu",
                                     workdir=tmp_path / "a")
    _assert_identical(single, flats)
    assert prov["resumed_layers"] == [0, 2] and prov["layer_ranks"] == [0, 0, 1]
    assert prov["layer_world_sizes"] == [2, 1, 2]
    # and a 1-process work directory with 2 processes: layers 0 and 2 missing, one each
    calibrate(_model(), tokens(4, 16), Q, method_config("flatquant"), CFG, workdir=tmp_path / "b")
    for i in (0, 2):
        (tmp_path / "b" / "layers" / f"layer_{i:03d}.safetensors").unlink()
    for flats, prov in launch_cpu(_run_rank, 2, str(tmp_path / "b"), threads=1):
        _assert_identical(single, flats)
        assert prov["layer_ranks"] == [0, 0, 1] and prov["resumed_layers"] == [1]
    assert not (tmp_path / "a" / ".lock").exists() and not (tmp_path / "b" / ".lock").exists()


def test_cli_calibrate_under_torchrun_matches_one_process(tmp_path, monkeypatch):
    """``torchrun --nproc-per-node 2 -m flatquant.cli calibrate`` (gloo on CPU) writes the 1-process transforms."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from flatquant.cli import main
    from tests.test_cli import TEXT, make_tiny_hf_folder

    monkeypatch.setenv("FLATQUANT_CACHE", str(tmp_path / "cache"))
    folder = make_tiny_hf_folder(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(TEXT)
    argv = ["calibrate", "--model", str(folder), "--device", "cpu", "--data", str(tmp_path / "corpus.txt"),
            "--nsamples", "4", "--seqlen", "16", "--epochs", "1", "--batch-size", "2"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "flatquant.cli",
                        *argv, "--out", str(tmp_path / "w2")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert main([*argv, "--out", str(tmp_path / "w1")]) == 0
    one, two = (load_file(str(tmp_path / w / "transforms.safetensors")) for w in ("w1", "w2"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    meta = json.loads((tmp_path / "w2" / "transforms.json").read_text())["calibration"]
    assert meta["world_size"] == 2 and meta["layer_ranks"] == [0, 1]
