"""RMSNorm, written once for the fake model, calibration, the real engine and the kernels' references."""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:  # (..., n), (n,) -> (..., n)
    """RMSNorm computed in at least fp32, returned in the input dtype: ``x · rsqrt(mean(x²) + eps) · weight``,
    rounded once at the end."""
    ct = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(ct)).to(x.dtype)
