"""Kronecker-factored linear transforms (spec §2.1): ``x (P1 ⊗ P2)`` as two small matmuls."""

from __future__ import annotations

import math
from functools import cache

from torch import Tensor


@cache
def decompose_dim(n: int) -> tuple[int, int]:
    """Factor pair ``(n1, n2)`` of ``n`` closest to square, ``n1 <= n2`` (a prime gives ``(1, n)``).

    Searches ``a = ceil(sqrt(n)), a+1, ...`` for ``a² - n = b²`` and returns ``(a - b, a + b)``.
    """
    if n < 1:
        raise ValueError(f"cannot decompose dimension {n}")
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        b2 = a * a - n
        b = math.isqrt(b2)
        if b * b == b2:
            return a - b, a + b
        a += 1


def kron_transform(
    x: Tensor,  # (..., n1 * n2)
    left: Tensor,  # (n1, n1)
    right: Tensor,  # (n2, n2)
) -> Tensor:
    """Return ``x @ kron(left, right)`` without forming the Kronecker product.

    A row reshaped row-major to ``X (n1, n2)`` maps to ``leftᵀ X right``.
    """
    n1, n2 = left.shape[0], right.shape[0]
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"last dimension {x.shape[-1]} != {n1}×{n2}")
    xr = x.reshape(*x.shape[:-1], n1, n2)
    y = left.mT.to(x.dtype) @ (xr @ right.to(x.dtype))
    return y.reshape(x.shape)


def head_transform(
    x: Tensor,  # (..., heads, d) or (..., heads * d) with d = matrix size
    matrix: Tensor,  # (d, d)
) -> Tensor:
    """Apply ``matrix`` on the right to every trailing block of ``matrix.shape[0]`` elements."""
    d = matrix.shape[0]
    xr = x.reshape(*x.shape[:-1], x.shape[-1] // d, d)
    return (xr @ matrix.to(x.dtype)).reshape(x.shape)


def head_mix(
    x: Tensor,  # (..., heads * d)
    matrix: Tensor,  # (heads, heads)
) -> Tensor:
    """Mix heads: per token, view ``x`` as ``Y (heads, d)`` and return ``matrixᵀ Y`` flattened."""
    h = matrix.shape[0]
    xr = x.reshape(*x.shape[:-1], h, x.shape[-1] // h)
    return (matrix.mT.to(x.dtype) @ xr).reshape(x.shape)
