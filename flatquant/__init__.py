"""flatquant: FlatQuant W4A4KV4 quantization for Llama-family models, fake-quant and real INT4.

The public API is re-exported here and imported on first use (``flatquant.quantize_model`` loads
:mod:`flatquant.api` then), so ``import flatquant`` stays light and loads no Triton kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": ("flatquant.models.hf", "load"),
    "quantize_model": ("flatquant.api", "quantize_model"),
    "from_transforms": ("flatquant.api", "from_transforms"),
    "fp_model": ("flatquant.api", "fp_model"),
    "CalibConfig": ("flatquant.calib.config", "CalibConfig"),
    "bits_preset": ("flatquant.presets", "bits_preset"),
    "method_config": ("flatquant.calib.methods", "method_config"),
    "METHODS": ("flatquant.calib.methods", "METHODS"),
    "Method": ("flatquant.calib.methods", "Method"),
    "tokenize_corpus": ("flatquant.data", "tokenize_corpus"),
    "calibration_windows": ("flatquant.data", "calibration_windows"),
    "eval_windows": ("flatquant.data", "eval_windows"),
    "perplexity": ("flatquant.evaluation.perplexity", "perplexity"),
    "save_transforms": ("flatquant.io", "save_transforms"),
    "load_transforms": ("flatquant.io", "load_transforms"),
    "export_checkpoint": ("flatquant.models.real.checkpoint", "export_checkpoint"),
}
__all__ = ["__version__", "load", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """The re-exported names, imported from their modules on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flatquant' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(module), attr)


def load(path, device="cpu", **kwargs):
    """Load a real quantized checkpoint written by ``flatquant export`` (see
    :func:`flatquant.models.real.checkpoint.load_checkpoint`).

    Returns a :class:`flatquant.models.real.RealModel`; wrap it with
    ``flatquant.models.hf_real.FlatQuantForCausalLM.wrap(model, tokenizer)`` for ``generate()`` and lm-eval.
    """
    from .models.real.checkpoint import load_checkpoint

    return load_checkpoint(path, device, **kwargs)
