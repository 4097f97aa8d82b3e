"""Transform parametrisations (spec §2.2-2.3): each returns a matrix P and its inverse-transpose.

A factor's parameters are a flat ``dict[str, Tensor]``; ``materialize_factor`` maps them to
``(P, P^{-T})``. Kinds:

* ``svd``: ``P = U diag(σ) Vᵀ`` with ``U, V`` Cayley maps of raw matrices; ``P^{-T} = U diag(1/σ) Vᵀ``
  exactly, with no inverse.
* ``inv``: ``P`` a free matrix; ``P^{-T}`` from a float64 inverse.
* ``fixed``: ``P`` given (Hadamard, random orthogonal, identity); ``P^{-T}`` stored alongside.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cayley(raw: Tensor) -> Tensor:  # (..., n, n) -> (..., n, n) orthogonal
    """Cayley map of the skew part of ``tril(raw)``: ``(I - A/2)^{-1} (I + A/2)``.

    Computed as an explicit inverse times ``I + A/2``: ``I - A/2`` with ``A`` skew-symmetric has
    singular values ``≥ 1``, so the inverse is as accurate as a solve, and neither ``inv_ex`` nor its
    backward (two matmuls) checks errors on the host. ``linalg.solve``'s backward does, which costs a
    device sync per step and makes the step impossible to capture in a CUDA graph.
    """
    low = torch.tril(raw, -1)
    a = low - low.mT
    eye = torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)
    return torch.linalg.inv_ex(eye - a / 2)[0] @ (eye + a / 2)


def random_orthogonal(n: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """Haar-random orthogonal ``n×n`` matrix (QR of a Gaussian, signs of diag(R) folded in)."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype)


def hadamard(n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised Sylvester Hadamard matrix; ``n`` must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def random_hadamard(n: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
    """``H · diag(±1)`` when ``n`` is a power of two, otherwise a Haar-random orthogonal matrix."""
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
        return (hadamard(n, dtype=torch.float64) * signs.unsqueeze(0)).to(dtype)
    return random_orthogonal(n, generator=generator, dtype=dtype)


def init_factor(kind: str, n: int, *, generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Initial parameters of one ``n×n`` factor.

    ``svd`` starts its raw U/V matrices at random orthogonal matrices (as the official code does,
    so the effective start is the Cayley map of their skew part, a random orthogonal P); ``inv``
    starts at a random orthogonal matrix; the fixed kinds store the matrix itself.
    """
    if kind == "svd":
        return {
            "u": random_orthogonal(n, generator=generator, dtype=dtype),
            "v": random_orthogonal(n, generator=generator, dtype=dtype),
            "sigma": torch.ones(n, dtype=dtype),
        }
    if kind == "inv":
        return {"m": random_orthogonal(n, generator=generator, dtype=dtype)}
    if kind == "hadamard":
        return {"m": random_hadamard(n, generator=generator, dtype=dtype)}
    if kind == "orthogonal":
        return {"m": random_orthogonal(n, generator=generator, dtype=dtype)}
    if kind == "identity":
        return {"m": torch.eye(n, dtype=dtype)}
    raise ValueError(f"unknown transform kind {kind!r}")


def materialize_factor(kind: str, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(P, P^{-T})`` of one factor, differentiable in its parameters."""
    if kind == "svd":
        u, v, s = cayley(p["u"]), cayley(p["v"]), p["sigma"]
        return (u * s) @ v.mT, (u / s) @ v.mT
    if kind == "inv":
        m = p["m"]
        return m, torch.linalg.inv(m.double()).mT.to(m.dtype)
    if kind in ("hadamard", "orthogonal", "identity"):
        return p["m"], p["m"]  # orthogonal: P^{-T} = P
    raise ValueError(f"unknown transform kind {kind!r}")


def smooth_scale(
    xmax: Tensor,  # (n,) max |x_j| over calibration tokens
    wmax: Tensor,  # (n,) max |W[:, j]| over the consuming weights
    alpha: float,
) -> Tensor:
    """SmoothQuant-style per-channel scale ``s = clamp(wmax^(1-α) / xmax^α, min=1e-5)``.

    Activations are multiplied by ``s`` and weight columns divided by it.
    """
    return torch.clamp(wmax.clamp(min=1e-5).pow(1 - alpha) / xmax.clamp(min=1e-5).pow(alpha), min=1e-5)
