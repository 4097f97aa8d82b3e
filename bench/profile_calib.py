"""Profile calibration steps of one layer (where the time goes): top ops by device and host time.

    python bench/profile_calib.py --shape smollm2-135m --steps 6
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calib import SHAPES  # noqa: E402

from flatquant.calib.graph import capturable_linalg  # noqa: E402
from flatquant.calib.loop import fp_layer_pass, layer_loss  # noqa: E402
from flatquant.calib.methods import method_config  # noqa: E402
from flatquant.models.flat import init_flat_params  # noqa: E402
from flatquant.models.model import rope_for  # noqa: E402
from flatquant.models.random import random_weights  # noqa: E402
from flatquant.presets import bits_preset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    a = ap.parse_args()
    dev = torch.device("cuda")
    one = SHAPES[a.shape].__class__(**{**SHAPES[a.shape].to_dict(), "n_layers": 1, "vocab_size": 16})
    w = random_weights(one, generator=torch.Generator().manual_seed(0), outlier_channels=8)
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    frozen = {k: v.to(dev) for k, v in w.layers[0].items()}
    x = torch.randn(a.batch, a.seqlen, one.hidden, device=dev)
    rope = rope_for(w.to(dev), a.seqlen, dev)
    y, stats = fp_layer_pass(frozen, x, rope, one, a.batch, want_stats=True)
    tr, fx = init_flat_params(frozen, one, q, t, absmax=stats, generator=torch.Generator().manual_seed(0))
    tr = {k: v.to(dev) for k, v in tr.items()}
    fx = {k: v.to(dev) for k, v in fx.items()}
    amp = torch.bfloat16
    gf = torch.func.grad_and_value(layer_loss, has_aux=True)

    def step_func():
        return gf(tr, fx, frozen, x, y, rope, one, q, t.kind, amp)

    def step_autograd():
        leaves = {k: v.detach().requires_grad_() for k, v in tr.items()}
        mse, _ = layer_loss(leaves, fx, frozen, x, y, rope, one, q, t.kind, amp)
        return torch.autograd.grad(mse, list(leaves.values()))

    def fwd_only():
        with torch.no_grad():
            return layer_loss(tr, fx, frozen, x, y, rope, one, q, t.kind, amp)

    with capturable_linalg(dev):  # the LU backend the calibration loop uses
        for name, fn in (("fwd_only", fwd_only), ("torch.func", step_func), ("autograd", step_autograd)):
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            torch.cuda.synchronize()
            print(f"{name:<12} {1000 * (time.perf_counter() - t0) / a.steps:8.1f} ms/step", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step_func()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
