"""A functional AdamW with a cosine schedule over flat parameter dicts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import CalibConfig

Params = dict[str, Tensor]


def cosine_lr(step: int, total: int, base: float, eta_min: float, warmup_steps: int = 0) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``: cosine from base to eta_min.

    With warmup, the first ``warmup_steps`` steps scale it linearly from 1% to 100%.
    """
    lr = eta_min + (base - eta_min) * (1 + math.cos(math.pi * min(step, total) / max(total, 1))) / 2
    if warmup_steps and step < warmup_steps:
        lr *= 0.01 + 0.99 * step / warmup_steps
    return lr


def schedule(total: int, cfg: CalibConfig, device: torch.device | str = "cpu") -> Tensor:
    """Per-step scalars of the whole run, ``(total, 4)`` float32: transform lr, clip lr, ``1-β1^t``, ``1-β2^t``.

    Kept on the device so a step reads its row without a host round trip (and a captured CUDA graph
    can replay every step with the same kernels).
    """
    floor = cfg.lr * cfg.eta_min_ratio
    clip_floor = floor if cfg.shared_eta_min else floor * cfg.clip_lr_mult
    b1, b2 = cfg.betas
    rows = [(cosine_lr(t, total, cfg.lr, floor, cfg.warmup_steps),
             cosine_lr(t, total, cfg.lr * cfg.clip_lr_mult, clip_floor, cfg.warmup_steps),
             1 - b1 ** (t + 1), 1 - b2 ** (t + 1)) for t in range(total)]
    return torch.tensor(rows, dtype=torch.float64).reshape(total, 4).to(device, torch.float32)


@torch.no_grad()
def adamw_apply(
    params: Params, grads: Params, m: Params, v: Params, lrs: dict[str, Tensor | float],
    bc1: Tensor | float, bc2: Tensor | float, cfg: CalibConfig,
) -> tuple[Params, Params, Params]:
    """One AdamW step (PyTorch's formulation, decoupled weight decay) as a pure function.

    ``lrs``, ``bc1 = 1-β1^t`` and ``bc2 = 1-β2^t`` may be Python floats or 0-dim tensors; inputs are
    never mutated. Returns new ``(params, m, v)``.
    """
    b1, b2 = cfg.betas
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g, lr = grads[k], lrs[k]
        new_m[k] = m[k].mul(b1).add_(g, alpha=1 - b1)
        new_v[k] = v[k].mul(b2).addcmul_(g, g, value=1 - b2)
        denom = (new_v[k].sqrt() / bc2 ** 0.5).add_(cfg.eps)
        new_p[k] = p * (1 - lr * cfg.weight_decay) - new_m[k] / denom * (lr / bc1)
    return new_p, new_m, new_v
