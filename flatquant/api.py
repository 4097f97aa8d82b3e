"""Public pipeline: calibrate a method, fold it into the weights, evaluate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .calib.config import CalibConfig
from .calib.gptq import gptq_model
from .calib.loop import calibrate, reparameterize
from .calib.methods import METHODS, Method, apply_global_transform, get_method, needs_data
from .core.spec import QuantConfig, TransformConfig
from .models.model import ModelWeights

if TYPE_CHECKING:
    from .models.real import RealModel

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
    method: str | Method,
    qcfg: QuantConfig,
    ccfg: CalibConfig,
    calib_tokens: Tensor | None,
    device: torch.device | str = "cpu",
    workdir: Path | None = None,
    tcfg: TransformConfig | None = None,
) -> QuantizedModel:
    """Calibrate ``method`` (if it learns anything), fold transforms into weights, quantize weights.

    Args:
        method: a registered method's name (:data:`flatquant.calib.methods.METHODS`) or a
            :class:`~flatquant.calib.methods.Method`; the unquantized one (``fp``) returns the model unchanged.
        calib_tokens: calibration windows ``(N, T)``; used only when the transforms need data (or for GPTQ).
        workdir: holds per-layer progress for resume.
        tcfg: per-layer transforms replacing the method's (``method`` may then be an unregistered name, a label).

    Raises:
        ValueError: an unknown method name (without ``tcfg``); a method or GPTQ that needs data without
            ``calib_tokens``.
        NotImplementedError: a method with a global transform (a documented slot only).
    """
    if isinstance(method, Method):
        m: Method | None = method
    else:
        m = get_method(method) if tcfg is None else METHODS.get(method)
    name = method.name if isinstance(method, Method) else method
    if m is not None and not m.quantize:
        return QuantizedModel(weights, [], QuantConfig(), m.layer, name, 0.0)
    if tcfg is None:
        assert m is not None, "get_method returned a method"
        tcfg = m.layer
    t0 = time.time()
    weights = apply_global_transform(weights, m)
    flats = calibrate(weights, calib_tokens if needs_data(tcfg) else None, qcfg, tcfg, ccfg, device=device,
                      workdir=workdir)
    if ccfg.weight_quantizer == "gptq" and qcfg.w.enabled:
        if calib_tokens is None:
            raise ValueError("GPTQ needs calibration data")
        folded = reparameterize(weights, flats, qcfg, tcfg, quantize_weights=False)
        folded = gptq_model(folded, calib_tokens, qcfg, ccfg, device=device)
    else:
        folded = reparameterize(weights, flats, qcfg, tcfg)
    return QuantizedModel(folded, flats, qcfg, tcfg, name, time.time() - t0)


def from_transforms(weights: ModelWeights, flats: list[dict[str, Tensor]], qcfg: QuantConfig,
                    tcfg: TransformConfig, method: str) -> QuantizedModel:
    """Rebuild a fake-quantized (RTN-weight) model from saved transforms."""
    return QuantizedModel(reparameterize(weights, flats, qcfg, tcfg), flats, qcfg, tcfg, method, 0.0)


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Text generation settings, validated before any model is loaded.

    Attributes:
        max_new_tokens: tokens to generate (>= 1).
        temperature: 0 is greedy; > 0 samples.
        top_p: nucleus mass in (0, 1] (1 keeps the whole distribution).
        seed: sampling seed.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        from .models.real.sampling import check_sampling

        check_sampling(self.max_new_tokens, self.temperature, self.top_p)


def fp_model(weights: ModelWeights, device: torch.device | str = "cpu", *,
             dtype: torch.dtype | None = None) -> RealModel:
    """The unquantized model on the inference engine (KV cache, streamed ``generate``), for comparisons.

    Args:
        weights: the model as loaded (:func:`flatquant.models.hf.load`).
        dtype: compute dtype; default float32 on CPU and bfloat16 on CUDA.
    """
    from .models.real import RealConfig, RealModel, RealWeights, layer_from_tensors

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = RealConfig(args=weights.args, qcfg=QuantConfig(), dtype=dtype, rope_scaling=weights.rope_scaling,
                     real_linears=False)
    layers = tuple(layer_from_tensors({k: v.to(device) for k, v in p.items()}, cfg) for p in weights.layers)
    top = {k: v.to(device=device, dtype=torch.float32 if k == "rope.inv_freq" else dtype)
           for k, v in weights.top.items()}
    return RealModel(RealWeights(cfg=cfg, top=top, layers=layers), compile_decode=False, compile_prefill=False)
