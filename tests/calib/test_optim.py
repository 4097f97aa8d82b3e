from __future__ import annotations

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.optim import adamw_apply, adamw_init, adamw_update, cosine_lr, group_lrs, schedule


def test_adamw_matches_torch():
    cfg = CalibConfig(lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    p0 = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)}
    ref = {k: v.clone().requires_grad_() for k, v in p0.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, weight_decay=0.01)
    params, state = dict(p0), adamw_init(p0)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in p0.items()}
        for k, v in ref.items():
            v.grad = grads[k].clone()
        opt.step()
        params, state = adamw_update(params, grads, state, {k: 1e-2 for k in params}, cfg)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach())
    assert torch.equal(p0["a"], p0["a"].clone())  # inputs are not mutated by design (new dicts)


def test_cosine_matches_torch_scheduler():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=5e-6)
    for step in range(20):
        assert abs(opt.param_groups[0]["lr"] - cosine_lr(step, 20, 5e-3, 5e-6)) < 1e-12
        opt.step()
        sched.step()


def test_clip_group_gets_ten_times_lr_and_shared_floor():
    cfg = CalibConfig(lr=5e-3)
    lrs = group_lrs(["t", "c"], lambda k: k == "c", 0, 10, cfg)
    assert abs(lrs["c"] - 10 * lrs["t"]) < 1e-12
    end = group_lrs(["t", "c"], lambda k: k == "c", 10, 10, cfg)
    assert abs(end["c"] - end["t"]) < 1e-12 and abs(end["t"] - 5e-6) < 1e-12


@pytest.mark.parametrize("warmup,shared", [(0, True), (3, False)])
def test_schedule_rows_match_python_schedule(warmup: int, shared: bool):
    cfg = CalibConfig(lr=5e-3, epochs=4, nsamples=8, batch_size=4, warmup_steps=warmup, shared_eta_min=shared)
    total = cfg.epochs * cfg.steps_per_epoch
    table = schedule(total, cfg)
    for t in range(total):
        lrs = group_lrs(["t", "c"], lambda k: k == "c", t, total, cfg)
        torch.testing.assert_close(table[t], torch.tensor([lrs["t"], lrs["c"], 1 - 0.9 ** (t + 1),
                                                           1 - 0.999 ** (t + 1)]))


def test_tensor_scalars_give_the_float_update():
    cfg = CalibConfig(lr=1e-2)
    g = torch.Generator().manual_seed(1)
    p = {"a": torch.randn(4, 3, generator=g)}
    grads = {"a": torch.randn(4, 3, generator=g)}
    m, v = {"a": torch.zeros(4, 3)}, {"a": torch.zeros(4, 3)}
    snapshot = [d["a"].clone() for d in (p, grads, m, v)]
    f = adamw_apply(p, grads, m, v, {"a": 1e-2}, 0.1, 0.001, cfg)
    t = adamw_apply(p, grads, m, v, {"a": torch.tensor(1e-2)}, torch.tensor(0.1), torch.tensor(0.001), cfg)
    for a, b in zip(f, t):
        torch.testing.assert_close(a["a"], b["a"])
    assert not torch.equal(f[0]["a"], p["a"])
    assert all(torch.equal(s, d["a"]) for s, d in zip(snapshot, (p, grads, m, v)))  # inputs not mutated
