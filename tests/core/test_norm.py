"""``flatquant.core.norm.rms_norm``: the formula, computed in fp32 for 16-bit inputs and rounded once."""

from __future__ import annotations

import pytest
import torch

from flatquant.core.norm import rms_norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rms_norm(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=g, dtype=torch.float64) * 7).to(dtype)
    w = (torch.rand(64, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    xd = x.double()
    want = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    # one rounding to the output dtype (fp32 arithmetic for 16-bit inputs): within one ulp of the exact value
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22, torch.float64: 2**-50}[dtype]
    assert bool(((out.double() - want).abs() <= want.abs() * ulp + 1e-30).all())
    if dtype in (torch.bfloat16, torch.float16):  # computed in fp32, not in the 16-bit dtype
        assert torch.equal(out, rms_norm(x.float(), w.float(), 1e-5).to(dtype))
