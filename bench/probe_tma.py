"""Does a TMA-fed W8A8 loop beat our pointer-based one on Hopper? Times the host-descriptor (TMA) int8 GEMM
(``flatquant.ops.matmul.w8a8_tma_triton``) per tile next to the pointer W8A8 kernel and cuBLAS bf16 on prefill
shapes; checks it against the reference first. (The committed ``probe_tma_h100.log`` came from the version of this
script before the kernel moved into the library, which also tried Triton's warp specialization: no gain.)

Usage (H100): ``python bench/probe_tma.py --out bench/results/probe_tma_h100.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.ops import reference as ref  # noqa: E402
from flatquant.ops.matmul import MODE_W8A8, qmatmul_triton, w8a8_tma_triton  # noqa: E402

# (M, K, N); (2048, 4096, 1024) is a GQA k/v projection at batch-1 prefill: 64 programs of 256 x 128 on 132 SMs
SHAPES = [(8192, 4096, 14336), (8192, 4096, 4096), (2048, 4096, 4096), (2048, 14336, 4096), (2048, 4096, 1024),
          (2048, 4096, 14336)]
TILES = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
         (128, 128, 128, 4, 4), (256, 128, 128, 8, 4), (128, 256, 64, 8, 5)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_tma.json"))
    args = ap.parse_args()
    rows = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
        sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
        bf16 = do_bench(lambda: torch.nn.functional.linear(x, wb), rep=100) * 1e3
        ours = do_bench(lambda: qmatmul_triton(a, sa, w, sw, None, k, MODE_W8A8, torch.bfloat16), rep=100) * 1e3
        want = ref.int_matmul_ref(a, w, sa, sw, None, torch.bfloat16)
        print(f"M={m} K={k} N={n}: bf16 {bf16:.1f} us, pointer W8A8 {ours:.1f} us ({bf16 / ours:.2f}x bf16)",
              flush=True)
        row = {"m": m, "k": k, "n": n, "bf16_us": bf16, "pointer_w8a8_us": ours, "tma": []}
        for tile in TILES:
            try:
                got = w8a8_tma_triton(a, sa, w, sw, None, torch.bfloat16, config=tile)
                ok = bool(torch.equal(got, want))
                us = do_bench(lambda tile=tile: w8a8_tma_triton(a, sa, w, sw, None, torch.bfloat16, config=tile),
                              rep=100) * 1e3
            except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory: record and go on
                row["tma"].append({"tile": tile, "error": str(e)[:160]})
                print(f"  tma {tile}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            row["tma"].append({"tile": tile, "us": us, "equal": ok, "x_bf16": bf16 / us, "x_pointer": ours / us})
            print(f"  tma {tile}: {us:8.1f} us {bf16 / us:5.2f}x bf16 {ours / us:5.2f}x pointer kernel equal={ok}",
                  flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "env": environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
