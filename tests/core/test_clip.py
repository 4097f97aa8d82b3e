from __future__ import annotations

import torch

from flatquant.core.clip import clip_weight, init_clip_logits


def test_clip_weight_bounds_rows():
    w = torch.tensor([[-2.0, 1.0, 4.0], [-1.0, 0.5, 1.0]])
    lo = torch.zeros(2, 1)  # sigmoid(0) = 0.5
    hi = torch.zeros(2, 1)
    c = clip_weight(w, lo, hi)
    torch.testing.assert_close(c, torch.tensor([[-1.0, 1.0, 2.0], [-0.5, 0.5, 0.5]]))


def test_clip_weight_gradients_reach_logits_and_weight():
    w = torch.randn(4, 8, requires_grad=True)
    p = {k: v.requires_grad_() for k, v in init_clip_logits((4, 1), 0.0).items()}
    clip_weight(w, p["lo"], p["hi"]).pow(2).sum().backward()
    assert p["hi"].grad.abs().sum() > 0 and p["lo"].grad.abs().sum() > 0 and w.grad.abs().sum() > 0


def test_large_logit_is_almost_no_clip():
    w = torch.randn(3, 5)
    c = clip_weight(w, torch.full((3, 1), 20.0), torch.full((3, 1), 20.0))
    torch.testing.assert_close(c, w)
