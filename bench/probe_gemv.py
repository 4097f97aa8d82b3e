"""Decode GEMV: the split-K kernel plus its separate reduce kernel against the in-kernel reduction with arrival
counters (``flatquant::w4a4_gemv``), on the LLaMA-3-8B decode shapes (fused qkv and gate/up stack their G code
sets as rows), CUDA-graph timed side by side, results compared bit for bit.

Usage (GPU): ``python bench/probe_gemv.py --out bench/results/probe_gemv_h200.json`` (under a minute).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402
from timing import copy_bandwidth, graph_time, rotating, time_all  # noqa: E402

from flatquant.ops import sm_count, w4a4_gemv, w4a4_matmul  # noqa: E402
from flatquant.ops.gemv import MODE_W4A4, counter_slots, default_split_k, qgemv_triton  # noqa: E402

# (name, K, N, rows per token): qkv (3 code sets), o, gate/up (2), down
SHAPES = [("qkv", 4096, 6144, 3), ("o", 4096, 4096, 1), ("gate_up", 4096, 28672, 2), ("down", 14336, 4096, 1)]


def sweep(dev: torch.device, tokens: int) -> list[dict]:
    """Every (block_n, block_k, warps, stages, split) of a small grid on each decode shape at ``tokens`` tokens,
    weights rotated through copies larger than L2 (as in a model, where each weight is read once per step)."""
    rows = []
    for name, k, n, g in SHAPES:
        m = g * tokens
        gen = torch.Generator(device=dev).manual_seed(k + n)
        ws = rotating(lambda: torch.randint(0, 256, (n, k // 2), device=dev, generator=gen, dtype=torch.uint8),
                      n * k // 2)
        sw = torch.rand(n, device=dev, generator=gen)
        x = torch.randint(0, 256, (m, k // 2), device=dev, generator=gen, dtype=torch.uint8)
        sx = torch.rand(m, device=dev, generator=gen)
        cnt = torch.zeros(len(ws), triton.cdiv(n, 16) * 4, dtype=torch.int32, device=dev)
        want = w4a4_matmul(x, sx, ws[0], sw, None, torch.bfloat16)
        base = None
        for bn, bk, warps, stages, mult in itertools.product((32, 64, 128), (256, 512), (4, 8), (2, 4), (0, 1, 2, 4)):
            n_tiles = triton.cdiv(n, bn) * triton.cdiv(m, min(max(16, triton.next_power_of_2(m)), 64))
            split = default_split_k(n_tiles, k, bk, sm_count(dev))
            split = max(1, split * mult // 2) if mult else 1  # mult 0: no split; 1: half; 2: default; 4: double

            def call(i: int, bn=bn, bk=bk, warps=warps, stages=stages, split=split) -> torch.Tensor:
                return qgemv_triton(x, sx, ws[i], sw, None, k, MODE_W4A4, torch.bfloat16, split, bn, bk,
                                    num_warps=warps, num_stages=stages, counters=cnt[i])

            try:
                ok = torch.equal(call(0), want)
                us = time_all([lambda i=i: call(i) for i in range(len(ws))])
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                rows.append({"shape": name, "m": m, "config": [bn, bk, warps, stages, split], "error": str(e)[:200]})
                continue
            r = {"shape": name, "m": m, "config": [bn, bk, warps, stages, split], "us": us, "equal": ok,
                 "read_TBps": (n * k // 2) / (us * 1e-6) / 1e12,
                 "default": (bn, bk, warps, stages, mult) == (64, 256, 4, 4, 2)}
            rows.append(r)
            if r["default"]:
                base = us
        best = min((r for r in rows if r["shape"] == name and "us" in r and r["equal"]), key=lambda r: r["us"])
        print(f"{name:>8} M={m:>2} | default {base:6.2f} us | best {best['us']:6.2f} us {best['config']} "
              f"({best['read_TBps']:.2f} TB/s read)", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_gemv.json"))
    ap.add_argument("--sweep", type=int, default=0, metavar="TOKENS",
                    help="instead: sweep the kernel's launch configurations at this many tokens (cold weights)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    if a.sweep:
        rows = sweep(dev, a.sweep)
        write_json(a.out, {"command": " ".join(sys.argv), "env": environment(), "copy_GBps": bw * 1e-9,
                           "sweep_tokens": a.sweep, "rows": rows})
        return 0
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
