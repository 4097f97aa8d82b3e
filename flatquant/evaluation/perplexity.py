"""Perplexity over non-overlapping windows (spec §4.1), on the fake path and on the real engine.

Both paths share one batch loop (:func:`nlls_from_logits`); they differ only in the function that turns a batch of
windows into logits (the layer-by-layer fake forward, or :meth:`RealModel.forward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..calib.guard import NonFiniteError, check_perplexity_finite
from ..core.spec import QuantConfig
from ..data import DEFAULT_CORPUS
from ..models.layer import layer_forward
from ..models.model import ModelWeights, embed, head, rope_for

if TYPE_CHECKING:
    from ..models.real import RealModel


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
def nlls_from_logits(
    logits_fn: Callable[[Tensor], Tensor],  # (B, T) int64 on device -> (B, T, vocab)
    windows: Tensor,  # (N, T) int64
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    desc: str | None = None,
) -> Tensor:  # (N,) fp32 on CPU
    """Mean next-token cross-entropy of each window, ``batch_size`` windows per call of ``logits_fn``.

    Args:
        logits_fn: the model: token ids ``(B, T)`` on ``device`` to logits ``(B, T, vocab)``.
        windows: the windows, on any device (each batch is moved to ``device``).
        desc: label of a progress bar (shown on a terminal only); ``None``: no bar.

    Raises:
        ValueError: no windows, windows shorter than 2 tokens, or ``batch_size < 1``.
    """
    check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    out = []
    starts = range(0, windows.shape[0], batch_size)
    for s in starts if desc is None else tqdm(starts, desc=desc, leave=False, disable=None):
        tok = windows[s:s + batch_size].to(device)
        logits = logits_fn(tok).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                               reduction="none").view(tok.shape[0], -1).mean(1)
        out.append(loss.cpu())
    return torch.cat(out)


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
    """Mean next-token cross-entropy of each window on the fake path, run layer by layer on ``device``.

    Raises:
        ValueError: no windows, or windows shorter than 2 tokens.
    """
    check_windows(windows)
    device = torch.device(device)
    qcfg = qcfg or QuantConfig()
    on_dev = weights.to(device)
    rope = rope_for(on_dev, windows.shape[1], device)

    def logits(tok: Tensor) -> Tensor:  # (B, T) -> (B, T, vocab)
        x = embed(on_dev, tok)
        for p in on_dev.layers:
            x = layer_forward(p, x, rope, on_dev.args, qcfg)
        return head(on_dev, x)

    return nlls_from_logits(logits, windows, device=device, batch_size=batch_size, desc=desc)


def real_window_nlls(model: RealModel, windows: Tensor, *, batch_size: int = 1) -> Tensor:  # (N, T) -> (N,)
    """Mean next-token cross-entropy of each window on the real engine (one prefill per batch, KV4 included).

    Raises:
        ValueError: no windows, or windows shorter than 2 tokens.
    """
    return nlls_from_logits(model.forward, windows, device=model.device, batch_size=batch_size)


def perplexity(weights: ModelWeights, windows: Tensor, qcfg: QuantConfig | None = None, **kw) -> float:
    """``exp`` of the mean of per-window mean losses.

    Raises:
        ValueError: no windows, or windows shorter than 2 tokens.
        NonFiniteError: a window's loss is NaN/inf (never reported as a perplexity).
    """
    return perplexity_from_nlls(window_nlls(weights, windows, qcfg, **kw), kw.get("desc", "perplexity"))
