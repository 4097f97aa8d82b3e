"""Does a TMA-fed W8A8 loop beat our pointer-based one on Hopper? Times a host-descriptor (TMA) int8 GEMM with
the same fp32 epilogue, with and without Triton's warp specialization, next to the shipped W8A8 kernel and cuBLAS
bf16, on prefill shapes; checks it against the reference first.

Usage (H100): ``python bench/probe_tma.py --out bench/results/probe_tma_h100.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.ops import reference as ref  # noqa: E402
from flatquant.ops import w8a8_matmul  # noqa: E402

SHAPES = [(8192, 4096, 14336), (8192, 4096, 4096), (2048, 4096, 4096), (2048, 14336, 4096)]  # (M, K, N)
TILES = [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4),
         (256, 128, 128, 8, 4), (128, 256, 64, 8, 5)]


@triton.jit
def _w8a8_tma_kernel(a_desc, w_desc, sa_ptr, sw_ptr, c_ptr, M, N, K, stride_cm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     STAGES: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if WS:
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES, warp_specialize=True):
            a = a_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    else:
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            a = a_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def w8a8_tma(a, sa, w, sw, tile, ws: bool):  # (M, K) int8, (N, K) int8 -> (M, N) bf16
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages = tile
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_tma_kernel[grid](a_desc, w_desc, sa, sw, out, m, n, k, out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           GROUP_M=8, STAGES=stages, WS=ws, num_warps=warps)
    return out


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
        ours = do_bench(lambda: w8a8_matmul(a, sa, w, sw, None, torch.bfloat16), rep=100) * 1e3
        want = ref.int_matmul_ref(a, w, sa, sw, None, torch.bfloat16)
        print(f"M={m} K={k} N={n}: bf16 {bf16:.1f} us, shipped W8A8 {ours:.1f} us ({bf16 / ours:.2f}x bf16)", flush=True)
        row = {"m": m, "k": k, "n": n, "bf16_us": bf16, "shipped_w8a8_us": ours, "tma": []}
        for tile in TILES:
            for ws in (False, True):
                try:
                    got = w8a8_tma(a, sa, w, sw, tile, ws)
                    ok = bool(torch.equal(got, want))
                    us = do_bench(lambda tile=tile, ws=ws: w8a8_tma(a, sa, w, sw, tile, ws), rep=100) * 1e3
                except Exception as e:  # noqa: BLE001 -- unsupported variant: record and go on
                    row["tma"].append({"tile": tile, "ws": ws, "error": str(e)[:160]})
                    print(f"  tma {tile} ws={ws}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                row["tma"].append({"tile": tile, "ws": ws, "us": us, "equal": ok, "x_bf16": bf16 / us,
                                   "x_shipped": ours / us})
                print(f"  tma {tile} ws={ws}: {us:8.1f} us {bf16 / us:5.2f}x bf16 {ours / us:5.2f}x shipped "
                      f"equal={ok}", flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "env": environment(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
