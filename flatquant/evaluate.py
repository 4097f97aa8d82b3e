"""Perplexity over non-overlapping windows (spec §4.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .calib.guard import NonFiniteError, check_perplexity_finite
from .core.spec import QuantConfig
from .data import DEFAULT_CORPUS
from .models.layer import layer_forward
from .models.model import ModelWeights, embed, head, rope_for


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Perplexity settings (spec §4.1), validated before any model is loaded.

    Attributes:
        data: corpus name or local .txt/.jsonl file (its test split).
        seqlen: window length in tokens (>= 2: a window needs a next token to predict).
        windows: evaluate only the first ``windows`` windows (``None``: all).
        batch_size: windows per forward.
    """

    data: str = DEFAULT_CORPUS
    seqlen: int = 2048
    windows: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"the evaluation window length must be >= 2 tokens, got {self.seqlen!r}")
        if self.windows is not None and (not isinstance(self.windows, int) or self.windows < 1):
            raise ValueError(f"the number of evaluation windows must be >= 1 (or all), got {self.windows!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"the evaluation batch size must be >= 1, got {self.batch_size!r}")


def check_windows(windows: Tensor) -> None:  # (N, T) int64
    """Refuse an empty batch of windows or windows shorter than 2 tokens (their loss would be NaN)."""
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs windows of shape (N >= 1, T >= 2), got {tuple(windows.shape)}")


def perplexity_from_nlls(nlls: Tensor, what: str = "perplexity") -> float:  # nlls: (N,)
    """``exp`` of the mean of per-window mean losses.

    Raises:
        NonFiniteError: a window's loss is NaN/inf, or the perplexity overflows.
    """
    check_perplexity_finite(nlls, what)
    mean = nlls.mean().item()
    if mean > math.log(torch.finfo(torch.float64).max):
        raise NonFiniteError(f"{what}: mean loss {mean:.1f} overflows exp(); the model's output is broken")
    return math.exp(mean)


@torch.no_grad()
def window_nlls(
    weights: ModelWeights,
    windows: Tensor,  # (N, T) int64
    qcfg: QuantConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    desc: str = "perplexity",
) -> Tensor:  # (N,)
    """Mean next-token cross-entropy of each window, run layer by layer on ``device``.

    Raises:
        ValueError: no windows, or windows shorter than 2 tokens.
    """
    check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    qcfg = qcfg or QuantConfig()
    on_dev = weights.to(device)
    rope = rope_for(on_dev, windows.shape[1], device)
    out = []
    for s in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False, disable=None):
        tok = windows[s:s + batch_size].to(device)
        x = embed(on_dev, tok)
        for p in on_dev.layers:
            x = layer_forward(p, x, rope, on_dev.args, qcfg)
        logits = head(on_dev, x).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                               reduction="none").view(tok.shape[0], -1).mean(1)
        out.append(loss.cpu())
    return torch.cat(out)


def perplexity(weights: ModelWeights, windows: Tensor, qcfg: QuantConfig | None = None, **kw) -> float:
    """``exp`` of the mean of per-window mean losses.

    Raises:
        ValueError: no windows, or windows shorter than 2 tokens.
        NonFiniteError: a window's loss is NaN/inf (never reported as a perplexity).
    """
    return perplexity_from_nlls(window_nlls(weights, windows, qcfg, **kw), kw.get("desc", "perplexity"))
