"""Perplexity over non-overlapping windows (spec §4.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .core.spec import QuantConfig
from .models.layer import layer_forward
from .models.model import ModelWeights, embed, head, rope_for


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
    """Mean next-token cross-entropy of each window, run layer by layer on ``device``."""
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
    """``exp`` of the mean of per-window mean losses."""
    return math.exp(window_nlls(weights, windows, qcfg, **kw).mean().item())
