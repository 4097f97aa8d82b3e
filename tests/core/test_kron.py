from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flatquant.core.kron import decompose_dim, head_mix, head_transform, kron_transform


@pytest.mark.parametrize("n, pair", [(3584, (56, 64)), (4096, (64, 64)), (5120, (64, 80)), (11008, (86, 128)),
                                     (14336, (112, 128)), (18944, (128, 148)), (576, (24, 24)), (1536, (32, 48)),
                                     (896, (28, 32)), (13, (1, 13))])
def test_decompose_dim_closest_pair(n, pair):
    assert decompose_dim(n) == pair


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(0, 1000))
def test_kron_transform_equals_torch_kron(n1, n2, rows, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n1 * n2, generator=g, dtype=torch.float64)
    left = torch.randn(n1, n1, generator=g, dtype=torch.float64)
    right = torch.randn(n2, n2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_transform(x, left, right), x @ torch.kron(left, right))


def test_kron_transform_rejects_wrong_width():
    with pytest.raises(ValueError, match="last dimension"):
        kron_transform(torch.randn(2, 10), torch.eye(3), torch.eye(3))


def test_head_mix_and_head_transform_are_kron_with_identity():
    h, d = 3, 4
    x = torch.randn(5, h * d, dtype=torch.float64)
    m = torch.randn(h, h, dtype=torch.float64)
    v = torch.randn(d, d, dtype=torch.float64)
    torch.testing.assert_close(head_mix(x, m), x @ torch.kron(m, torch.eye(d, dtype=torch.float64)))
    torch.testing.assert_close(head_transform(x, v), x @ torch.kron(torch.eye(h, dtype=torch.float64), v))
