"""One helper that turns a reference function into a ``torch.library`` custom op with its CUDA kernel and fake.

The decorated function is written once: its signature (with type hints) is the op's schema, its docstring the op's
documentation and its body the kernel of every device without a kernel of its own (CPU: it validates the
arguments and calls :mod:`flatquant.ops.reference`)::

    @register_op("flatquant::pack_int4", cuda=pack_int4_triton, fake=_pack_int4_fake)
    def pack_int4(codes: Tensor) -> Tensor:
        # the docstring here becomes the op's
        _check_even(codes)
        return ref.pack_int4_ref(codes)

Nothing here runs at ``import flatquant``: an op is registered when its module (under :mod:`flatquant.ops`) is
imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.library import CustomOpDef


def register_op(
    qualname: str,
    *,
    fake: Callable[..., Any],
    cuda: Callable[..., Any] | None = None,
    mutates_args: str | Iterable[str] = (),
) -> Callable[[Callable[..., Any]], CustomOpDef]:
    """Decorator: register the decorated function as the custom op ``qualname`` (``"namespace::name"``).

    The decorated function's signature (type hints required) is the op's schema and its body the kernel of every
    device without a kernel of its own (CPU, and CUDA when ``cuda`` is None).

    Args:
        qualname: the op's name, e.g. ``"flatquant::kron_quant"`` (then ``torch.ops.flatquant.kron_quant``).
        fake: the shape/dtype function for ``torch.compile`` / ``FakeTensorMode``. It is called with the op's
            arguments **by name** (defaults applied), so it declares only the parameters it reads plus ``**_``.
        cuda: the CUDA kernel, typically the Triton launcher. It is called with all of the op's arguments, in the
            op's order (keyword-only ones by name) and with the op's defaults filled in, so a launcher whose
            leading parameters follow the op's signature is registered as is; it validates its inputs itself.
            None: the decorated function serves CUDA too.
        mutates_args: as :func:`torch.library.custom_op` (our ops are functional: ``()``).

    Returns:
        A decorator that returns the :class:`torch.library.CustomOpDef` (callable like the function), with the
        decorated function's docstring as its ``__doc__``.
    """

    def wrap(fn: Callable[..., Any]) -> CustomOpDef:
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
        sig = inspect.signature(fn)
        if cuda is not None:
            op.register_kernel("cuda", _call_with_defaults(cuda, sig))
        op.register_fake(_call_by_name(fake, sig))
        op.__doc__ = fn.__doc__
        return op

    return wrap


def _call_with_defaults(fn: Callable[..., Any], sig: inspect.Signature) -> Callable[..., Any]:
    """``fn`` called with every argument of ``sig``: the dispatcher passes the positional ones as a prefix with the
    trailing defaults dropped (and keyword-only ones equal to their default left out); they are put back here, so
    the kernel never relies on defaults of its own."""
    params = sig.parameters.values()
    positional = tuple(p.default for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    keyword = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    def call(*args: Any, **kwargs: Any) -> Any:
        if len(args) < len(positional):
            args += positional[len(args):]
        if len(kwargs) < len(keyword):
            kwargs = {**keyword, **kwargs}
        return fn(*args, **kwargs)

    return call


def _call_by_name(fn: Callable[..., Any], sig: inspect.Signature) -> Callable[..., Any]:
    """``fn`` called with the arguments of a call to ``sig`` bound to their names (defaults filled in)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return fn(**bound.arguments)

    return call
