"""Prefill int8 GEMM schedules on Hopper: the TMA-fed W8A8 kernel (``flatquant.ops.matmul.w8a8_tma_triton``) per
tile, one output tile per program and persistent (one program per SM looping over the tiles, with and without the
flattened software pipeline that overlaps a tile's epilogue with the next tile's loads), next to cuBLAS bf16 and
the kernel the engine calls (``int8_gemm_triton``, autotuned). Each variant is checked against the reference
first. (The committed ``probe_tma_h100.log`` came from an earlier version of this script, which also tried Triton's
warp specialization: no gain.)

Usage (Hopper): ``python bench/probe_tma.py --shapes engine --out bench/results/probe_tma_h200.json``;
``--shapes engine`` = the LLaMA-3-8B engine's fused projections (qkv, o, gate/up, down) at 2048 and 32768 tokens.
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
from flatquant.ops.matmul import MODE_W8A8, int8_gemm_triton, qmatmul_triton, w8a8_tma_triton  # noqa: E402

# (M, K, N); (2048, 4096, 1024) is a GQA k/v projection at batch-1 prefill: 64 programs of 256 x 128 on 132 SMs
SHAPES = {
    "h100": [(8192, 4096, 14336), (8192, 4096, 4096), (2048, 4096, 4096), (2048, 14336, 4096), (2048, 4096, 1024),
             (2048, 4096, 14336)],
    # the engine's fused qkv (N = 4096 + 2 * 1024), o, gate/up (2 * 14336) and down at batch 1 and 16 prefill
    "engine": [(m, k, n) for m in (2048, 32768)
               for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))],
}
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, persistent, flatten])
TILES = {
    "h100": [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
             (128, 128, 128, 4, 4), (256, 128, 128, 8, 4), (128, 256, 64, 8, 5)],
    "engine": [(256, 128, 128, 8, 4), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3)]
    + [(bm, bn, 128, 8, st, True, fl) for bm, bn in ((256, 128), (128, 256)) for st in (3, 4) for fl in (True, False)],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_tma.json"))
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="engine", help="shape and tile set (default engine)")
    ap.add_argument("--pointer", action="store_true", help="also time the pointer-based W8A8 kernel (autotuned)")
    args = ap.parse_args()
    rows = []
    for m, k, n in SHAPES[args.shapes]:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
        sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
        want = ref.int_matmul_ref(a, w, sa, sw, None, torch.bfloat16)
        bf16 = do_bench(lambda: torch.nn.functional.linear(x, wb), rep=100) * 1e3
        engine = do_bench(lambda: int8_gemm_triton(a, sa, w, sw, None, torch.bfloat16), rep=100) * 1e3
        row = {"m": m, "k": k, "n": n, "bf16_us": bf16, "engine_us": engine, "tma": []}
        line = f"M={m} K={k} N={n}: bf16 {bf16:.1f} us, engine (autotuned) {engine:.1f} us"
        if args.pointer:
            ours = do_bench(lambda: qmatmul_triton(a, sa, w, sw, None, k, MODE_W8A8, torch.bfloat16), rep=100) * 1e3
            row["pointer_w8a8_us"] = ours
            line += f", pointer W8A8 {ours:.1f} us"
        print(line, flush=True)
        for tile in TILES[args.shapes]:
            try:
                got = w8a8_tma_triton(a, sa, w, sw, None, torch.bfloat16, config=tile)
                ok = bool(torch.equal(got, want))
                us = do_bench(lambda tile=tile: w8a8_tma_triton(a, sa, w, sw, None, torch.bfloat16, config=tile),
                              rep=100) * 1e3
            except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory: record and go on
                row["tma"].append({"tile": tile, "error": str(e)[:160]})
                print(f"  tma {tile}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            tops = 2 * m * n * k / us * 1e-6
            row["tma"].append({"tile": tile, "us": us, "equal": ok, "x_bf16": bf16 / us, "x_engine": engine / us,
                               "tops": tops})
            print(f"  tma {tile}: {us:8.1f} us {tops:6.0f} TOPS {bf16 / us:5.2f}x bf16 {engine / us:5.2f}x engine "
                  f"equal={ok}", flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "env": environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
