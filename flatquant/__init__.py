"""flatquant: FlatQuant W4A4KV4 quantization for Llama-family models, fake-quant and real INT4."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="cpu", **kwargs):
    """Load a real quantized checkpoint written by ``flatquant export`` (see :func:`flatquant.export.load_checkpoint`).

    Returns a :class:`flatquant.models.real.RealModel`; wrap it with
    ``flatquant.models.hf_real.FlatQuantForCausalLM.wrap(model, tokenizer)`` for ``generate()`` and lm-eval.
    """
    from .export import load_checkpoint

    return load_checkpoint(path, device, **kwargs)
