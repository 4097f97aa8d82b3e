from __future__ import annotations

import pytest
import torch

from flatquant.calib.config import CalibConfig
from flatquant.calib.optim import adamw_apply, cosine_lr, schedule


def test_adamw_matches_torch():
    cfg = CalibConfig(lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    p0 = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g)}
    before = {k: v.clone() for k, v in p0.items()}
    ref = {k: v.clone().requires_grad_() for k, v in p0.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=1e-2, weight_decay=0.01)
    params = dict(p0)
    m, v = ({k: torch.zeros_like(t) for k, t in p0.items()} for _ in range(2))
    for t in range(1, 6):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in p0.items()}
        for k, r in ref.items():
            r.grad = grads[k].clone()
        opt.step()
        params, m, v = adamw_apply(params, grads, m, v, {k: 1e-2 for k in params}, 1 - 0.9**t, 1 - 0.999**t, cfg)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach())
    assert all(torch.equal(p0[k], before[k]) for k in p0)  # inputs are not mutated by design (new dicts)


def test_cosine_matches_torch_scheduler():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=5e-6)
    for step in range(20):
        assert abs(opt.param_groups[0]["lr"] - cosine_lr(step, 20, 5e-3, 5e-6)) < 1e-12
        opt.step()
        sched.step()


def test_clip_group_gets_ten_times_lr():
    row = schedule(10, CalibConfig(lr=5e-3))[0]
    torch.testing.assert_close(row[1], 10 * row[0])


@pytest.mark.parametrize("warmup,shared", [(0, True), (3, False)])
def test_schedule_rows_match_python_schedule(warmup: int, shared: bool):
    cfg = CalibConfig(lr=5e-3, epochs=4, nsamples=8, batch_size=4, warmup_steps=warmup, shared_eta_min=shared)
    total = cfg.epochs * cfg.steps_per_epoch
    table = schedule(total, cfg)
    clip_floor = 5e-6 if shared else 5e-5  # shared: the transforms' absolute floor lr·1e-3; else its own ratio
    for t in range(total):
        want = [cosine_lr(t, total, 5e-3, 5e-6, warmup), cosine_lr(t, total, 5e-2, clip_floor, warmup),
                1 - 0.9 ** (t + 1), 1 - 0.999 ** (t + 1)]
        torch.testing.assert_close(table[t], torch.tensor(want))


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
