from __future__ import annotations

import pytest
import torch

from flatquant.core.affine import (
    cayley,
    hadamard,
    init_factor,
    materialize_factor,
    random_hadamard,
    random_orthogonal,
    smooth_scale,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1, 5, 24, 64])
def test_cayley_and_random_orthogonal_are_orthogonal(n):
    x = torch.randn(n, n, dtype=torch.float64)
    for q in (cayley(x), random_orthogonal(n, generator=_gen(), dtype=torch.float64)):
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["svd", "inv"])
def test_inverse_transpose_is_exact(kind):
    p = {k: v.double() for k, v in init_factor(kind, 12, generator=_gen()).items()}
    if kind == "svd":
        p["sigma"] = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
        p["u"] = p["u"] + 0.1 * torch.randn(12, 12, dtype=torch.float64)
    else:
        p["m"] = p["m"] + 0.3 * torch.randn(12, 12, dtype=torch.float64)
    m, m_inv_t = materialize_factor(kind, p)
    torch.testing.assert_close(m_inv_t, torch.linalg.inv(m).T)


def test_svd_inverse_is_differentiable():
    p = {k: v.double().requires_grad_() for k, v in init_factor("svd", 6, generator=_gen()).items()}
    m, mi = materialize_factor("svd", p)
    (m.sum() + mi.sum()).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in p.values())


@pytest.mark.parametrize("n", [24, 32])
def test_random_hadamard_orthogonal(n):
    h = random_hadamard(n, generator=_gen(), dtype=torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    if n == 32:
        assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(12)


def test_smooth_scale_formula():
    xmax = torch.tensor([1.0, 100.0, 4.0])
    wmax = torch.tensor([1.0, 1.0, 0.25])
    s = smooth_scale(xmax, wmax, 0.5)
    torch.testing.assert_close(s, wmax.sqrt() / xmax.sqrt())
    torch.testing.assert_close((xmax * s) , (wmax / s))  # balanced ranges at alpha 0.5


def test_init_is_reproducible_and_fixed_kinds():
    a = init_factor("svd", 8, generator=_gen(3))
    b = init_factor("svd", 8, generator=_gen(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    m, mi = materialize_factor("identity", init_factor("identity", 4, generator=_gen()))
    assert torch.equal(m, torch.eye(4)) and torch.equal(mi, torch.eye(4))
    with pytest.raises(ValueError, match="unknown"):
        init_factor("nope", 4, generator=_gen())
