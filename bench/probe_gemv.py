"""Decode GEMV: the split-K kernel plus its separate reduce kernel against the in-kernel reduction with arrival
counters (``flatquant::w4a4_gemv``), on the LLaMA-3-8B decode shapes (fused qkv and gate/up stack their G code
sets as rows), CUDA-graph timed side by side, results compared bit for bit.

Usage (GPU): ``python bench/probe_gemv.py --out bench/results/probe_gemv_h200.json`` (under a minute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402
from timing import copy_bandwidth, graph_time  # noqa: E402

from flatquant.ops import w4a4_gemv, w4a4_matmul  # noqa: E402
from flatquant.ops.gemv import counter_slots  # noqa: E402

# (name, K, N, rows per token): qkv (3 code sets), o, gate/up (2), down
SHAPES = [("qkv", 4096, 6144, 3), ("o", 4096, 4096, 1), ("gate_up", 4096, 28672, 2), ("down", 14336, 4096, 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_gemv.json"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    rows = []
    for name, k, n, g in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(k + n)
        w = torch.randint(0, 256, (n, k // 2), device=dev, generator=gen, dtype=torch.uint8)
        sw = torch.rand(n, device=dev, generator=gen)
        for tokens in (1, 5):
            m = g * tokens
            x = torch.randint(0, 256, (m, k // 2), device=dev, generator=gen, dtype=torch.uint8)
            sx = torch.rand(m, device=dev, generator=gen)
            cnt = torch.zeros(counter_slots(n, dev, m), dtype=torch.int32, device=dev)
            want = w4a4_matmul(x, sx, w, sw, None, torch.bfloat16)
            got = w4a4_gemv(x, sx, w, sw, None, torch.bfloat16, cnt)
            t_two = graph_time(lambda: w4a4_matmul(x, sx, w, sw, None, torch.bfloat16))
            t_one = graph_time(lambda: w4a4_gemv(x, sx, w, sw, None, torch.bfloat16, cnt))
            again = w4a4_gemv(x, sx, w, sw, None, torch.bfloat16, cnt)  # after many graph replays
            floor = (n * k // 2 + m * k // 2) / (bw / 2) * 1e6  # bytes read at the copy's read bandwidth
            r = {"shape": name, "k": k, "n": n, "m": m, "two_kernel_us": t_two, "counters_us": t_one,
                 "floor_us": floor, "equal": bool(torch.equal(got, want) and torch.equal(again, want)),
                 "counters_zero": int(cnt.abs().sum()) == 0}
            rows.append(r)
            print(f"{name:>8} M={m:>2} | split-K + reduce {t_two:6.1f} us | counters {t_one:6.1f} us | floor "
                  f"{floor:5.1f} | equal {r['equal']} zero {r['counters_zero']}", flush=True)
    write_json(a.out, {"command": " ".join(sys.argv), "env": environment(), "copy_GBps": bw * 1e-9, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
