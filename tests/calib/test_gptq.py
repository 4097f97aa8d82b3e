from __future__ import annotations

import torch

from flatquant.calib.gptq import gptq_quantize
from flatquant.core.quant import fake_quant
from flatquant.core.spec import QuantSpec


def _err(w, q, x):
    return ((x @ (w - q).T) ** 2).mean().item()


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated features
    w = torch.randn(32, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    spec = QuantSpec(bits=4, granularity="per_channel")
    rtn = fake_quant(w, spec)
    for act_order in (False, True):
        gq = gptq_quantize(w, h, spec, blocksize=16, act_order=act_order)
        assert _err(w, gq, x) < 0.8 * _err(w, rtn, x)
        # outputs stay on each row's RTN grid
        s = w.abs().amax(1, keepdim=True) / 7
        torch.testing.assert_close(torch.round(gq / s) * s, gq, atol=1e-5, rtol=0)


def test_gptq_groups():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    w = torch.randn(8, 32, generator=g)
    gq = gptq_quantize(w, 2 * x.T @ x / 256, QuantSpec(bits=4, granularity="per_group", group_size=8), blocksize=8)
    assert torch.isfinite(gq).all() and _err(w, gq, x) < _err(w, torch.zeros_like(w), x) * 0.1
