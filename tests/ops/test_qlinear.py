from __future__ import annotations

import pytest
import torch

from flatquant.ops import QuantLinear, make_qlinear, qlinear


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


def test_fullgraph_compile_and_module() -> None:
    p, g = _params(4, 4)
    x = torch.randn(7, 96, generator=g).to(torch.bfloat16)
    eager = qlinear(x, p, "real")
    compiled = torch.compile(qlinear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, p, "real"), eager)
    module = QuantLinear(p)
    assert torch.equal(torch.compile(module, fullgraph=True, backend="aot_eager")(x), eager)
    assert torch.equal(QuantLinear(p, backend="fake")(x), qlinear(x, p, "fake"))


def test_head_mix_only() -> None:
    """o_proj form: left = O over 9 heads, no right factor."""
    g = torch.Generator().manual_seed(3)
    o = torch.linalg.qr(torch.randn(9, 9, generator=g))[0]
    p = make_qlinear(torch.randn(20, 9 * 8, generator=g), left=o)
    x = torch.randn(4, 72, generator=g).to(torch.float16)
    rel = (qlinear(x, p).float() - qlinear(x, p, "fake").float()).norm() / qlinear(x, p, "fake").float().norm()
    assert rel < 0.06
