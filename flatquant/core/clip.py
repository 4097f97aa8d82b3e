"""Learnable clipping as sigmoid-of-logit factors: LWC on weights, LAC on activations (spec §1.3-1.4)."""

from __future__ import annotations

import torch
from torch import Tensor


def clip_factor(logit: Tensor | None) -> Tensor | None:
    """``sigmoid(logit)``, or None when there is no clipping parameter."""
    return None if logit is None else torch.sigmoid(logit)


def init_clip_logits(shape: tuple[int, ...], value: float, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> dict[str, Tensor]:
    """A ``{"lo", "hi"}`` pair of clip logits filled with ``value``."""
    return {
        "lo": torch.full(shape, value, dtype=dtype, device=device),
        "hi": torch.full(shape, value, dtype=dtype, device=device),
    }


def clip_weight(
    w: Tensor,  # (out, in)
    lo_logit: Tensor,  # (out, 1)
    hi_logit: Tensor,  # (out, 1)
) -> Tensor:
    """LWC: clamp each row of ``w`` to ``[min_row·σ(lo), max_row·σ(hi)]``.

    The row extremes are not detached, so gradients reach the weight through the bounds too.
    """
    hi = w.amax(dim=-1, keepdim=True) * torch.sigmoid(hi_logit.to(w.dtype))
    lo = w.amin(dim=-1, keepdim=True) * torch.sigmoid(lo_logit.to(w.dtype))
    return torch.minimum(torch.maximum(w, lo), hi)
