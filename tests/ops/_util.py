"""Shared helpers for the ops tests: devices, hypothesis strategies, code comparison."""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()

# "cpu" runs the Triton launchers through the interpreter; "cuda" runs them natively on the GPU.
KERNEL_DEVICES = [
    # On a GPU machine the same tests run natively instead; mixing interpreted and native launches in one
    # process depends on the interpreter restoring triton.language, which older Triton releases do not.
    pytest.param("cpu", id="interpreter", marks=pytest.mark.skipif(CUDA, reason="GPU present: tested natively")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA")]),
]

DTYPES = [torch.bfloat16, torch.float16]

# Factor pairs (n1, n2) including non-powers-of-two and the spec's non-square ones (scaled down for the interpreter).
FACTORS = [(2, 4), (4, 6), (6, 10), (8, 8), (3, 16), (24, 24), (32, 48), (9, 64), (5, 12)]


@st.composite
def activations(draw: st.DrawFn, factors: list[tuple[int, int]] = FACTORS, max_tokens: int = 6) -> dict:
    """A token batch with zero rows and outlier channels, plus transform factors and LAC clip factors."""
    n1, n2 = draw(st.sampled_from(factors))
    t = draw(st.integers(1, max_tokens))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n1 * n2, generator=g) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    if draw(st.booleans()):
        x[:, int(torch.randint(n1 * n2, (1,), generator=g))] *= 100.0  # outlier channel
    if t > 1 and draw(st.booleans()):
        x[int(torch.randint(t, (1,), generator=g))] = 0.0  # all-zero row
    left = torch.linalg.qr(torch.randn(n1, n1, generator=g, dtype=torch.float64))[0] if draw(st.booleans()) else None
    right = torch.linalg.qr(torch.randn(n2, n2, generator=g, dtype=torch.float64))[0] if draw(st.booleans()) else None
    clip = torch.tensor([draw(st.floats(0.5, 1.0)), draw(st.floats(0.5, 1.0))], dtype=torch.float32)
    return {
        "x": x.to(dtype), "left": None if left is None else left.to(dtype),
        "right": None if right is None else right.to(dtype), "clip": clip, "n1": n1,
    }


def assert_codes_match(got: torch.Tensor, want: torch.Tensor, ratio: torch.Tensor | None = None,
                       rounded_intermediate: bool = False) -> None:
    """Integer codes equal, except ±1 where the fp32 accumulation order (tensor-core dot vs BLAS) can matter.

    ``ratio`` is x / s before rounding: within 1e-3 of a rounding tie ±1 is allowed. With
    ``rounded_intermediate`` (the documented 16-bit ``X·right`` intermediate, whose rounding an accumulation-order
    difference can flip) ±1 is also allowed at up to 0.1% of the codes away from ties.
    """
    got, want = got.int(), want.int()
    diff = (got - want).abs()
    if ratio is None:
        assert torch.equal(got, want), f"{int((diff > 0).sum())} codes differ"
        return
    near_tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-3
    assert int(diff.max()) <= 1
    away = int((diff > 0)[~near_tie].sum())
    budget = int(1e-3 * diff.numel()) if rounded_intermediate else 0
    assert away <= budget, f"{away} codes differ away from ties (allowed {budget})"
