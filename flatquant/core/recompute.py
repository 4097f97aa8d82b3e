"""Recompute-in-backward for a pure tensor function, usable under ``torch.func`` transforms.

``torch.utils.checkpoint`` relies on saved-tensor hooks, which ``torch.func.grad`` rejects. This autograd
function saves only the inputs of ``fn`` and recomputes ``fn``'s vector-Jacobian product in backward with
``torch.func.vjp``, so the intermediates of ``fn`` never outlive the forward pass. Gradients are exactly those
of ``fn`` itself (the same ops run again on the same inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
        return fn(*xs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.fn = inputs[0]
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xs = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        idx = [i for i, n in enumerate(need) if n]
        if not idx:
            return (None,) * (len(xs) + 1)

        def of_needed(*ys: Tensor) -> Tensor:  # inputs without a gradient (the frozen weight) stay constants
            full = list(xs)
            for i, y in zip(idx, ys):
                full[i] = y
            return ctx.fn(*full)

        vjp_fn = torch.func.vjp(of_needed, *(xs[i] for i in idx))[1]
        grads = dict(zip(idx, vjp_fn(grad)))
        return (None, *(grads.get(i) for i in range(len(xs))))


def recompute_in_backward(fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
    """``fn(*xs)``, keeping only ``xs`` for backward (``fn`` must be a pure function of its tensor inputs)."""
    return _Recompute.apply(fn, *xs)
