"""Public pipeline: calibrate a method, fold it into the weights, evaluate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .calib.config import CalibConfig
from .calib.gptq import gptq_model
from .calib.loop import calibrate, needs_data, reparameterize
from .core.spec import QuantConfig, TransformConfig
from .models.model import ModelWeights
from .presets import method_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizedModel:
    """A fake-quantized model: folded layers plus what produced them."""

    weights: ModelWeights
    flats: list[dict[str, Tensor]]
    qcfg: QuantConfig
    tcfg: TransformConfig
    method: str
    calib_seconds: float


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; clear error for an unavailable CUDA device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return d


def quantize_model(
    weights: ModelWeights,
    *,
    method: str,
    qcfg: QuantConfig,
    ccfg: CalibConfig,
    calib_tokens: Tensor | None,
    device: torch.device | str = "cpu",
    workdir: Path | None = None,
    tcfg: TransformConfig | None = None,
) -> QuantizedModel:
    """Calibrate ``method`` (if it learns anything), fold transforms into weights, quantize weights.

    ``method="fp"`` returns the model unchanged. ``workdir`` holds per-layer progress for resume.
    """
    if method == "fp":
        return QuantizedModel(weights, [], QuantConfig(), method_config("rtn"), "fp", 0.0)
    tcfg = tcfg or method_config(method)
    t0 = time.time()
    flats = calibrate(weights, calib_tokens if needs_data(tcfg) else None, qcfg, tcfg, ccfg, device=device,
                      workdir=workdir)
    if ccfg.weight_quantizer == "gptq" and qcfg.w.enabled:
        if calib_tokens is None:
            raise ValueError("GPTQ needs calibration data")
        folded = reparameterize(weights, flats, qcfg, tcfg, quantize_weights=False)
        folded = gptq_model(folded, calib_tokens, qcfg, ccfg, device=device)
    else:
        folded = reparameterize(weights, flats, qcfg, tcfg)
    return QuantizedModel(folded, flats, qcfg, tcfg, method, time.time() - t0)


def from_transforms(weights: ModelWeights, flats: list[dict[str, Tensor]], qcfg: QuantConfig,
                    tcfg: TransformConfig, method: str) -> QuantizedModel:
    """Rebuild a fake-quantized (RTN-weight) model from saved transforms."""
    return QuantizedModel(reparameterize(weights, flats, qcfg, tcfg), flats, qcfg, tcfg, method, 0.0)
