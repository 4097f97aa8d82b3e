"""Next-token sampling: greedy at temperature 0, else nucleus (top-p)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse generation settings that cannot work, in one line each (``ValueError``).

    ``max_new_tokens >= 1``; ``temperature`` finite and ``>= 0`` (0 = greedy); ``top_p`` in ``(0, 1]``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus cut), got {top_p!r}; "
                         "use temperature 0 for greedy decoding")


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens ``(B,)`` from ``logits (B, vocab)``: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
