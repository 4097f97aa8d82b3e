"""Perplexity: one batch loop for the fake and the real path, per-window losses, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flatquant.api import fp_model
from flatquant.evaluation.perplexity import (
    nlls_from_logits,
    perplexity,
    perplexity_from_nlls,
    real_window_nlls,
    window_nlls,
)
from flatquant.models.model import forward
from flatquant.presets import bits_preset
from tests.helpers import TINY, tiny_model, tokens


def _direct_nlls(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (N, T, V), (N, T) -> (N,)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                           reduction="none").view(x.shape[0], -1).mean(1)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_nlls_from_logits_is_per_window_whatever_the_batch(batch_size):
    x = tokens(5, 9, seed=3)
    table = torch.randn(TINY.vocab_size, TINY.vocab_size, generator=torch.Generator().manual_seed(0))
    calls = []

    def logits_fn(tok: torch.Tensor) -> torch.Tensor:
        calls.append(tok.shape[0])
        return table[tok]

    got = nlls_from_logits(logits_fn, x, batch_size=batch_size)
    torch.testing.assert_close(got, _direct_nlls(table[x], x))
    assert calls == [min(batch_size, 5 - s) for s in range(0, 5, batch_size)]


def test_nlls_from_logits_refuses_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        nlls_from_logits(lambda t: t, tokens(2, 4), batch_size=0)
    with pytest.raises(ValueError, match="windows of shape"):
        nlls_from_logits(lambda t: t, tokens(2, 1))


def test_fake_window_nlls_equal_the_model_forward():
    w, q = tiny_model(), bits_preset("w4a4kv4")
    x = tokens(3, 12, seed=4)
    want = _direct_nlls(forward(w, x, q), x)
    torch.testing.assert_close(window_nlls(w, x, q, batch_size=2), want, rtol=1e-5, atol=1e-5)
    assert perplexity(w, x, q) == pytest.approx(math.exp(float(want.mean())), rel=1e-5)


def test_real_and_fake_paths_agree_on_the_unquantized_model():
    w = tiny_model()
    x = tokens(3, 12, seed=5)
    real = real_window_nlls(fp_model(w, "cpu"), x, batch_size=2)
    torch.testing.assert_close(real, window_nlls(w, x), rtol=1e-4, atol=1e-4)
    assert perplexity_from_nlls(real) == pytest.approx(perplexity(w, x), rel=1e-4)
