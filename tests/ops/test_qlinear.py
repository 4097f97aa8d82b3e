from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flatquant.core.quant import fake_quant
from flatquant.core.spec import QuantSpec
from flatquant.ops import make_qlinear, qlinear


def _params(a_bits: int, w_bits: int, k: int = 96, n: int = 40, factors: tuple[int, int] = (8, 12)):
    g = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    w = torch.randn(n, k, generator=g)
    left = torch.linalg.qr(torch.randn(factors[0], factors[0], generator=g))[0]
    right = torch.linalg.qr(torch.randn(factors[1], factors[1], generator=g))[0]
    return make_qlinear(w, bias=torch.randn(n, generator=g), left=left, right=right, clip=(0.9, 0.95),
                        a_bits=a_bits, w_bits=w_bits), g


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
def test_fake_and_real_agree(a_bits: int, w_bits: int) -> None:
    p, g = _params(a_bits, w_bits)
    x = torch.randn(3, 5, 96, generator=g).to(torch.bfloat16)
    real, fake = qlinear(x, p, "real"), qlinear(x, p, "fake")
    assert real.shape == fake.shape == (3, 5, 40)
    rel = (real.float() - fake.float()).norm() / fake.float().norm()
    assert rel < (0.06 if a_bits == 4 else 0.02)


def test_fullgraph_compile() -> None:
    p, g = _params(4, 4)
    x = torch.randn(7, 96, generator=g).to(torch.bfloat16)
    eager = qlinear(x, p, "real")
    compiled = torch.compile(qlinear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, p, "real"), eager)


def _reference(x: Tensor, w: Tensor, bias: Tensor, left: Tensor | None, right: Tensor | None,
               clip: tuple[float, float], a_bits: int, w_bits: int) -> Tensor:
    """The quantized linear written out independently of qlinear: a dense ``kron(left, right)`` (identity for a
    missing factor), core per-token fake quant with LAC, core per-channel RTN weights, then ``y Wᵀ + b``."""
    k = x.shape[-1]
    n1 = left.shape[0] if left is not None else k // right.shape[0]
    n2 = k // n1
    eye = torch.eye(n1 if left is None else n2, dtype=x.dtype)
    a, b = (eye if left is None else left), (eye if right is None else right)
    t = torch.kron(a.contiguous(), b.contiguous())  # torch.kron refuses QR's column-major factors
    y = fake_quant(x @ t, QuantSpec(bits=a_bits), clip_lo=torch.tensor(clip[0], dtype=x.dtype),
                   clip_hi=torch.tensor(clip[1], dtype=x.dtype))
    w_q = fake_quant(w.float(), QuantSpec(bits=w_bits, granularity="per_channel")).to(x.dtype)
    return y @ w_q.T + bias


@pytest.mark.parametrize("form", ["kron", "left", "right"])
@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (8, 8)])
def test_fake_backend_matches_independent_reference(form: str, a_bits: int, w_bits: int) -> None:
    """qlinear(fake) == the reference above in float64 (so no rounding-boundary flips); a reference with the wrong
    transform (left factor transposed) or without LAC does not match, so the comparison can fail."""
    g = torch.Generator().manual_seed(7)
    n1, n2, n = 6, 8, 10
    x = torch.randn(2, 3, n1 * n2, generator=g, dtype=torch.float64)
    w, bias = torch.randn(n, n1 * n2, generator=g), torch.randn(n, generator=g, dtype=torch.float64)
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g, dtype=torch.float64))[0] if form != "right" else None
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g, dtype=torch.float64))[0] if form != "left" else None
    clip = (0.75, 0.875)  # exact in fp32 (QLinearParams keeps clip in fp32)
    p = make_qlinear(w, bias=bias, left=left, right=right, clip=clip, a_bits=a_bits, w_bits=w_bits,
                     dtype=torch.float64)
    got = qlinear(x, p, "fake")
    torch.testing.assert_close(got, _reference(x, w, bias, left, right, clip, a_bits, w_bits), rtol=1e-9, atol=1e-9)
    wrong_left = None if left is None else left.T
    wrong_right = right.T if left is None else right
    assert not torch.allclose(got, _reference(x, w, bias, wrong_left, wrong_right, clip, a_bits, w_bits), atol=1e-3)
    assert not torch.allclose(got, _reference(x, w, bias, left, right, (1.0, 1.0), a_bits, w_bits), atol=1e-3)


def test_head_mix_only() -> None:
    """o_proj form: left = O over 9 heads, no right factor."""
    g = torch.Generator().manual_seed(3)
    o = torch.linalg.qr(torch.randn(9, 9, generator=g))[0]
    p = make_qlinear(torch.randn(20, 9 * 8, generator=g), left=o)
    x = torch.randn(4, 72, generator=g).to(torch.float16)
    rel = (qlinear(x, p).float() - qlinear(x, p, "fake").float()).norm() / qlinear(x, p, "fake").float().norm()
    assert rel < 0.06
