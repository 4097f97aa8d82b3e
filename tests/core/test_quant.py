from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flatquant.core.quant import dequantize, fake_quant, qparams, quantize, round_ste
from flatquant.core.spec import QuantSpec

specs = st.builds(lambda b, s: QuantSpec(bits=b, sym=s), st.integers(2, 8), st.booleans())


def _tensor(seed: int, rows: int, cols: int, outlier: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if outlier:
        x[:, 0] *= 100
    return x


@given(specs, st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 40), st.booleans())
def test_grid_values_are_fixed_points(spec, seed, rows, cols, outlier):
    x = _tensor(seed, rows, cols, outlier)
    y = fake_quant(x, spec)
    torch.testing.assert_close(fake_quant(y, spec), y, rtol=1e-5, atol=1e-6)


@given(specs, st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 40))
def test_error_at_most_half_step(spec, seed, rows, cols):
    x = _tensor(seed, rows, cols, False)
    scale, _ = qparams(x, spec)
    err = (fake_quant(x, spec) - x).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)


@given(specs, st.integers(0, 10_000))
def test_codes_in_range_and_dequantize_matches_fake(spec, seed):
    x = _tensor(seed, 5, 17, True)
    codes, scale, zero = quantize(x, spec)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    torch.testing.assert_close(dequantize(codes, scale, zero, spec), fake_quant(x, spec))


def test_symmetric_4bit_grid_is_minus8_to_7_scale_over_7():
    spec = QuantSpec(bits=4)
    x = torch.tensor([[-7.0, 3.5, 7.0]])
    s, z = qparams(x, spec)
    assert s.item() == 1.0 and z.item() == 0.0
    assert (spec.qmin, spec.qmax) == (-8, 7)
    assert QuantSpec(bits=4, sym=False).qmax == 15


def test_zero_and_constant_rows_are_exact_and_finite():
    x = torch.zeros(3, 8)
    x[1] = 2.5
    x[2] = -1.25
    for sym in (True, False):
        y = fake_quant(x, QuantSpec(bits=4, sym=sym))
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, x)


def test_ste_gradient_is_identity_inside_range_and_zero_when_clipped():
    x = torch.tensor([[0.3, -0.7, 1.0]], requires_grad=True)
    s = torch.tensor([[0.1]])
    spec = QuantSpec(bits=4)
    from flatquant.core.quant import fake_quant_with

    fake_quant_with(x, s, torch.zeros_like(s), spec).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0]]))
    y = torch.tensor([0.2, 1.6], requires_grad=True)
    round_ste(y).sum().backward()
    torch.testing.assert_close(y.grad, torch.ones(2))


def test_clip_factors_shrink_the_range():
    x = torch.linspace(-4, 4, 33).unsqueeze(0)
    spec = QuantSpec(bits=4)
    s_full, _ = qparams(x, spec)
    s_clip, _ = qparams(x, spec, clip_lo=torch.tensor(0.5), clip_hi=torch.tensor(0.5))
    torch.testing.assert_close(s_clip, s_full / 2)
    # the symmetric grid reaches -(qmax + 1)·s on the negative side
    assert fake_quant(x, spec, clip_lo=torch.tensor(0.5), clip_hi=torch.tensor(0.5)).abs().max() <= 2 * 8 / 7 + 1e-6


def test_per_group_uses_one_scale_per_group():
    spec = QuantSpec(bits=4, granularity="per_group", group_size=4)
    x = torch.cat([torch.full((1, 4), 0.1), torch.full((1, 4), 100.0)], 1)
    x[0, 0] = 0.05
    y = fake_quant(x, spec)
    assert (y[0, :4] - x[0, :4]).abs().max() < 0.01
    codes, scale, _ = quantize(x, spec)
    assert scale.shape == (1, 2, 1)
    with pytest.raises(ValueError, match="divisible"):
        fake_quant(torch.randn(2, 6), spec)


def test_disabled_quantizer_is_identity():
    x = torch.randn(4, 4)
    assert fake_quant(x, QuantSpec(bits=16)) is x


@pytest.mark.parametrize("kw, msg", [({"bits": 1}, "bits"), ({"granularity": "per_group"}, "group_size"),
                                     ({"group_size": 8}, "group_size")])
def test_spec_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QuantSpec(**kw)
