"""kron_quant grid: one program per token (factors reloaded per token) against a capped grid whose programs loop
over tokens (factors loaded once per program), side by side with the memory-bandwidth floor, on LLaMA sizes.

Usage (H100): ``python bench/probe_kron.py --out bench/results/probe_kron_h100.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402
from timing import copy_bandwidth, graph_time  # noqa: E402

from flatquant.core.kron import decompose_dim  # noqa: E402
from flatquant.ops.kron_quant import grid_programs, kron_quant_triton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_kron.json"))
    a = ap.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    rows = []
    print(f"# copy bandwidth {bw * 1e-9:.0f} GB/s; default grid cap {grid_programs(dev)} programs")
    print(f"{'K':>6} {'M':>6} | {'per-token':>9} {'looped':>8} {'floor':>7} | {'speed-up':>8} "
          f"{'floor/looped':>12} equal")
    for k in (4096, 11008, 14336):
        n1, n2 = decompose_dim(k)
        g = torch.Generator(device=dev).manual_seed(k)
        left = torch.linalg.qr(torch.randn(n1, n1, device=dev, generator=g))[0].bfloat16()
        right = torch.linalg.qr(torch.randn(n2, n2, device=dev, generator=g))[0].bfloat16()
        clip = torch.tensor([0.9, 0.95], device=dev)
        for m in (1, 16, 256, 2048, 8192, 16384):
            x = torch.randn(m, k, device=dev, generator=g).bfloat16()
            old = kron_quant_triton(x, left, right, clip, n1, programs=m)
            new = kron_quant_triton(x, left, right, clip, n1)
            equal = bool(torch.equal(old[0], new[0]) and torch.equal(old[1], new[1]))
            t_old = graph_time(lambda: kron_quant_triton(x, left, right, clip, n1, programs=m))
            t_new = graph_time(lambda: kron_quant_triton(x, left, right, clip, n1))
            floor = (m * k * 2 + m * k // 2 + 4 * m) / bw * 1e6
            rows.append({"k": k, "m": m, "per_token_us": t_old, "looped_us": t_new, "floor_us": floor, "equal": equal})
            print(f"{k:>6} {m:>6} | {t_old:9.1f} {t_new:8.1f} {floor:7.1f} | {t_old / t_new:8.2f} "
                  f"{floor / t_new:12.2f} {equal}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": " ".join(sys.argv), "env": environment(), "copy_GBps": bw * 1e-9,
                                 "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
