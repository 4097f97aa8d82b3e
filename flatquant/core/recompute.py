"""Recompute-in-backward for a pure tensor function, usable under ``torch.func`` transforms.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which ``torch.func.grad`` rejects. This autograd
function saves only the inputs of ``fn`` and recomputes ``fn``'s vector-Jacobian product in backward with
``torch.func.vjp``, so the intermediates of ``fn`` never outlive the forward pass. Gradients are exactly those
of ``fn`` itself (the same ops run again on the same inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
        return fn(*xs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.fn = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        xs = ctx.saved_tensors
        _, vjp_fn = torch.func.vjp(ctx.fn, *xs)
        return (None, *(g if need else None for g, need in zip(vjp_fn(grad), ctx.needs_input_grad[1:])))


def recompute_in_backward(fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
    """``fn(*xs)``, keeping only ``xs`` for backward (``fn`` must be a pure function of its tensor inputs)."""
    return _Recompute.apply(fn, *xs)
