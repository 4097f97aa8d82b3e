"""NaN/inf guards: a non-finite loss, parameter or perplexity is an error, never a result."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


class NonFiniteError(ValueError):
    """A calibration loss, a learned parameter or a perplexity that is NaN or infinite."""


def check_layer_finite(layer: int, losses: Sequence[float], params: Mapping[str, Tensor]) -> None:
    """Refuse a calibrated layer whose epoch losses or learned parameters are not finite.

    Call it after a layer is trained and before it is saved, so a NaN never reaches a checkpoint.

    Args:
        layer: the layer index (named in the message).
        losses: the mean loss of each epoch (may be empty when nothing was trained).
        params: the layer's learned (and fixed) transform parameters.

    Raises:
        NonFiniteError: naming the layer, the first bad epoch or parameter, and what to try.
    """
    hint = "lower --lr, use --amp float32, or check the calibration data"
    for epoch, loss in enumerate(losses):
        if not math.isfinite(loss):
            raise NonFiniteError(f"layer {layer}: calibration loss is {loss} in epoch {epoch}; nothing was saved for "
                                 f"this layer ({hint})")
    for name, t in params.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"layer {layer}: learned parameter {name!r} holds NaN/inf; nothing was saved for "
                                 f"this layer ({hint})")


def check_perplexity_finite(nlls: Tensor, what: str = "perplexity") -> None:  # nlls: (N,)
    """Refuse per-window losses that are NaN or infinite (the perplexity would be meaningless).

    Raises:
        NonFiniteError: naming the first bad window.
    """
    bad = (~torch.isfinite(nlls)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise NonFiniteError(f"{what}: window {i} has a non-finite loss ({float(nlls[i])}) in {bad.numel()} of "
                             f"{nlls.numel()} windows; the model produces NaN/inf (check the transforms and bit "
                             "settings)")
