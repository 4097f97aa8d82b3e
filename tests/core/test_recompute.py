"""Recompute-in-backward: same gradients as the plain function, under torch.func and plain autograd, less saved."""

from __future__ import annotations

import torch

from flatquant.core.recompute import recompute_in_backward


def _chain(w, a, b):
    return torch.clamp(w * torch.sigmoid(a), max=0.5).exp() * b.tanh()


def _loss(p, w, use):
    y = recompute_in_backward(_chain, w, p["a"], p["b"]) if use else _chain(w, p["a"], p["b"])
    return (y**2).sum()


def _inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 7, generator=g, dtype=torch.float64)
    return w, {"a": torch.randn(6, 1, generator=g, dtype=torch.float64),
               "b": torch.randn(6, 1, generator=g, dtype=torch.float64)}


def test_func_grad_equals_plain_function():
    w, p = _inputs()
    got, want = torch.func.grad(_loss)(p, w, True), torch.func.grad(_loss)(p, w, False)
    for k in p:
        assert torch.equal(got[k], want[k]) and got[k].abs().sum() > 0


def test_autograd_and_saved_tensors():
    w, p = _inputs()
    saved = {}
    for use in (True, False):
        leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
        ptrs = set()

        def pack(t, ptrs=ptrs):
            ptrs.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _loss(leaves, w, use)
        loss.backward()
        saved[use] = (len(ptrs), {k: v.grad for k, v in leaves.items()})
    assert all(torch.equal(saved[True][1][k], saved[False][1][k]) for k in p)
    assert saved[True][0] < saved[False][0]  # only the inputs (and the final square's input) are kept
