"""CUDA-graph replay of the calibration step equals eager stepping; CPU never captures."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.graph import _close, deterministic_kernels
from flatquant.calib.loop import _use_cuda_graph, fp_layer_pass, train_layer
from flatquant.calib.methods import method_config
from flatquant.models.flat import init_flat_params
from flatquant.models.model import embed, rope_for
from flatquant.presets import bits_preset
from tests.helpers import TINY, tiny_model, tokens

CFG = CalibConfig(nsamples=4, seqlen=16, batch_size=2, epochs=3, lr=5e-3)


def _train(device: str, cuda_graph: str, amp: torch.dtype, captures: list[bool] | None = None):
    w = tiny_model(TINY)
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    x = embed(w, tokens(4, 16)).to(device)
    rope = rope_for(w, 16, device)
    frozen = {k: v.to(device) for k, v in w.layers[0].items()}
    outs, stats = fp_layer_pass(frozen, x, rope, TINY, 2, want_stats=True)
    tr, fx = init_flat_params(frozen, TINY, q, t, absmax=stats, generator=torch.Generator().manual_seed(0))
    tr = {k: v.to(device) for k, v in tr.items()}
    fx = {k: v.to(device) for k, v in fx.items()}
    return train_layer(tr, fx, frozen, x, outs, rope, TINY, q, t, replace(CFG, cuda_graph=cuda_graph),
                       generator=torch.Generator(), amp=amp, on_capture=None if captures is None else captures.append)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_replay_equals_eager(amp):
    eager, l_eager = _train("cuda", "off", amp)
    captures: list[bool] = []
    graph, l_graph = _train("cuda", "on", amp, captures)
    assert captures == [True]  # the graph really replayed (a fallback would compare eager with eager)
    assert l_graph == pytest.approx(l_eager, rel=1e-3)
    for k in eager:
        torch.testing.assert_close(graph[k], eager[k], rtol=1e-3, atol=1e-5)


def test_cpu_never_captures_and_on_is_refused():
    auto = replace(CFG, cuda_graph="auto")
    assert not _use_cuda_graph(auto, torch.device("cpu"))
    assert not _use_cuda_graph(CFG, torch.device("cuda"))  # default off
    assert _use_cuda_graph(auto, torch.device("cuda"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _use_cuda_graph(replace(CFG, cuda_graph="on"), torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda_graph"):
        CalibConfig(cuda_graph="yes")


def test_capture_check_compares_against_update_size():
    ref = {"a": torch.zeros(3)}
    after = {"a": torch.full((3,), 1e-2)}
    assert _close({"a": after["a"] + 1e-6}, after, ref, 1e-2)
    assert not _close({"a": after["a"] + 1e-3}, after, ref, 1e-2)


def test_cpu_auto_never_attempts_a_capture():
    captures: list[bool] = []
    _, losses = _train("cpu", "auto", torch.float32, captures)
    assert captures == [] and losses[-1] < losses[0]


def test_deterministic_kernels_sets_and_restores_the_global_flag(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one raises, never drifts
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(False):
        assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_deterministic_training_repeats_bit_for_bit(device):
    """Two trainings of one layer under the default ``deterministic=True`` give bit-identical parameters (on CUDA
    the flash-attention backward's atomic adds made two runs differ), and no op of the step lacks a deterministic
    implementation (it would raise)."""
    amp = torch.bfloat16 if device == "cuda" else torch.float32
    assert CFG.deterministic
    (a, _), (b, _) = _train(device, "off", amp), _train(device, "off", amp)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
