"""Where the integer GEMM's time goes: every tile configuration of each kernel mode, with and without swapped
operands, timed side by side with cuBLAS bf16 and ``torch._int_mm`` on a few shapes, plus the compiled kernel's
TTGIR line of its first MMA (does the unpacked operand reach the tensor cores from registers or shared memory?).

Second section (``gemv``): the split-K small-M kernel (:mod:`flatquant.ops.gemv`) at decode sizes, M in {1, 4, 16},
over split_k and a few BLOCK_N/BLOCK_K choices, next to the tiled kernel (through the ops, autotuned) and bf16
``F.linear``. These are timed like ``bench_ops.py``: CUDA-graph replay (no host launch overhead) and weights rotated
across copies so that every call streams its weight from HBM, not L2.

Usage (H100): ``python bench/probe_gemm.py --out bench/results/probe_gemm_h100.json [--sections tiles,gemv]``.
Prints tables, writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402
from timing import rotating, time_all  # noqa: E402

from flatquant.ops import reference as ref  # noqa: E402
from flatquant.ops import sm_count, w4a4_matmul, w4a8_matmul, w8a8_matmul  # noqa: E402
from flatquant.ops.gemv import default_blocks, default_split_k, qgemv_triton, split_plan  # noqa: E402
from flatquant.ops.matmul import MODE_W4A4, MODE_W4A8, MODE_W8A8, m_bucket, qmatmul_kernel  # noqa: E402

SHAPES = [(8192, 4096, 14336), (8192, 4096, 4096), (16, 4096, 4096), (16, 4096, 14336)]  # (M, K, N)
TILES = {  # (BLOCK_M tokens, BLOCK_N features, BLOCK_K, warps, stages)
    False: [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 256, 8, 3),
            (128, 256, 256, 8, 3), (64, 128, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 256, 4, 4)],
    True: [(128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
           (128, 256, 128, 8, 4), (64, 256, 128, 8, 4), (256, 256, 128, 8, 3), (16, 128, 128, 4, 5),
           (16, 128, 256, 4, 4), (32, 128, 128, 4, 5), (16, 256, 128, 8, 4)],
}


def _mma_line(compiled) -> str:
    ir = compiled.asm.get("ttgir", "")
    for line in ir.splitlines():
        if "warp_group_dot" in line or "tt.dot" in line:
            return line.strip()[:300]
    return ""


def _operands(m: int, k: int, n: int, mode: int, block_k: int):
    dev = "cuda"
    a8 = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=dev)
    w8 = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
    if mode == MODE_W8A8:
        return a8, w8
    wp = ref.pack_int4_ref(w8)
    if mode == MODE_W4A4:
        return ref.pack_int4_ref(a8), wp
    return a8, ref.halves_layout_ref(wp, block_k)


def probe_tiles(rows: list[dict]) -> None:
    """Every tile configuration of the tiled kernel on SHAPES (eager ``do_bench``), best per mode printed."""
    for (m, k, n) in SHAPES:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        wb = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        bf16 = do_bench(lambda: torch.nn.functional.linear(x, wb), rep=50) * 1e3
        xi = torch.randint(-8, 8, (max(m, 32), k), dtype=torch.int8, device="cuda")
        wi = torch.randint(-8, 8, (k, n), dtype=torch.int8, device="cuda")
        intmm = do_bench(lambda: torch._int_mm(xi, wi), rep=50) * 1e3
        print(f"M={m} K={k} N={n}: bf16 {bf16:.1f} us, _int_mm {intmm:.1f} us", flush=True)
        sa = torch.rand(m, device="cuda")
        sw = torch.rand(n, device="cuda")
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        for mode, swap in itertools.product((MODE_W8A8, MODE_W4A8, MODE_W4A4), (False, True)):
            if mode == MODE_W8A8 and swap:
                continue
            best = None
            for bm, bn, bk, warps, stages in TILES[swap]:
                if (m <= 16) != (bm <= 32):
                    continue
                aa, ww = _operands(m, k, n, mode, bk)
                grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
                args = (aa, ww.view(torch.int8), sa, sw, sa, out, m, n, k, aa.stride(0), ww.stride(0), out.stride(0),
                        m_bucket(m))
                kw = dict(MODE=mode, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=k % bk == 0,
                          SWAP_AB=swap, num_warps=warps, num_stages=stages)
                try:
                    compiled = qmatmul_kernel[grid](*args, **kw)
                    us = do_bench(lambda: qmatmul_kernel[grid](*args, **kw), rep=50) * 1e3
                except Exception as e:  # noqa: BLE001 -- out of shared memory etc.: record and go on
                    rows.append({"m": m, "k": k, "n": n, "mode": mode, "swap": swap,
                                 "tile": [bm, bn, bk, warps, stages], "error": str(e)[:200]})
                    continue
                row = {"m": m, "k": k, "n": n, "mode": mode, "swap": swap, "tile": [bm, bn, bk, warps, stages],
                       "us": us, "x_bf16": bf16 / us, "x_int_mm": intmm / us, "tops": 2 * m * n * k / us / 1e6}
                rows.append(row)
                if best is None or us < best[0]:
                    best = (us, row, _mma_line(compiled))
            if best:
                us, row, line = best
                name = {MODE_W8A8: "W8A8", MODE_W4A8: "W4A8", MODE_W4A4: "W4A4"}[mode]
                print(f"  {name:5s} swap={swap!s:5s} best {us:8.1f} us  {bf16 / us:5.2f}x bf16  "
                      f"{intmm / us:5.2f}x int_mm  {row['tops']:6.0f} TOPS  tile {row['tile']}\n      {line}",
                      flush=True)


GEMV_MS = [1, 4, 16]
GEMV_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
GEMV_SPLITS = [1, 2, 4, 8, 16]
GEMV_BLOCKS = {  # (BLOCK_N, BLOCK_K); the first is the CUDA default of gemv.default_blocks
    MODE_W4A4: [(64, 256), (128, 256), (64, 512)],
    MODE_W4A8: [(64, 256), (128, 128), (64, 512)],
    MODE_W8A8: [(64, 128), (32, 256), (128, 128)],
}
MODE_NAMES = {MODE_W8A8: "W8A8", MODE_W4A8: "W4A8", MODE_W4A4: "W4A4"}
TILED_OPS = {MODE_W4A4: w4a4_matmul, MODE_W4A8: w4a8_matmul, MODE_W8A8: w8a8_matmul}
def _gemv_operands(m: int, k: int, n: int, mode: int) -> tuple:
    """(a, w_codes, make_w): activation operand, weight codes and a maker of a fresh weight operand copy."""
    bits_a = 4 if mode == MODE_W4A4 else 8
    a = torch.randint(-(2 ** (bits_a - 1)), 2 ** (bits_a - 1), (m, k), dtype=torch.int8, device="cuda")
    bits_w = 8 if mode == MODE_W8A8 else 4
    wc = torch.randint(-(2 ** (bits_w - 1)), 2 ** (bits_w - 1), (n, k), dtype=torch.int8, device="cuda")
    if mode == MODE_W8A8:
        w = wc
    elif mode == MODE_W4A4:
        a, w = ref.pack_int4_ref(a), ref.pack_int4_ref(wc)
    else:
        w = ref.halves_layout_ref(ref.pack_int4_ref(wc))
    return a, wc, w.clone


def probe_gemv(rows: list[dict], rep: int, save: Callable[[], None]) -> None:
    """Split-K small-M kernel vs the tiled kernel (ops, autotuned) vs bf16 ``F.linear``, CUDA-graph timed.

    ``save`` is called after each (K, N, M), so that a run cut short still leaves its rows.
    """
    dev = torch.device("cuda")
    sms = sm_count(dev)
    print(f"\n# gemv (split-K, M <= 16) vs tiled ops vs bf16; CUDA-graph replay, L2-rotated weights; {sms} SMs; "
          "us per call", flush=True)
    print(f"{'M':>3} {'K':>6} {'N':>6} {'mode':>5} | {'bf16':>7} {'tiled':>7} {'gemv':>7} {'dflt':>7} | "
          f"{'gemv/bf16':>9} {'gemv/tiled':>10} {'GB/s':>6} | best config (split eff, BN, BK); default")
    for k, n in GEMV_SHAPES:
        wb = rotating(lambda: torch.randn(n, k, dtype=torch.bfloat16, device=dev), n * k * 2)
        for m in GEMV_MS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            bf16 = time_all([lambda w=w: F.linear(x, w) for w in wb], rep=rep)
            rows.append({"section": "gemv", "m": m, "k": k, "n": n, "kernel": "bf16", "us": bf16})
            sa = torch.rand(m, device=dev) + 0.5
            sw = torch.rand(n, device=dev) + 0.5
            for mode in (MODE_W4A4, MODE_W4A8, MODE_W8A8):
                a, wc, make_w = _gemv_operands(m, k, n, mode)
                w0 = make_w()
                ws = rotating(make_w, w0.numel())
                wbytes = w0.numel()
                op = TILED_OPS[mode]
                tiled = time_all([lambda w=w: op(a, sa, w, sw, None, torch.bfloat16) for w in ws], rep=rep)
                rows.append({"section": "gemv", "m": m, "k": k, "n": n, "mode": mode, "kernel": "tiled", "us": tiled,
                             "x_bf16": bf16 / tiled})
                a_codes = ref.unpack_int4_ref(a) if mode == MODE_W4A4 else a
                want = ref.int_matmul_ref(a_codes, wc, sa, sw, None, torch.bfloat16)
                dn, dk = default_blocks(mode, dev)
                d_split = split_plan(k, dk, default_split_k(triton.cdiv(n, dn), k, dk, sms))[1]
                best, dflt = None, None
                for (bn, bk), split_k in itertools.product(GEMV_BLOCKS[mode], GEMV_SPLITS):
                    split = split_plan(k, bk, split_k)[1]
                    if split != split_k:
                        continue
                    kw = dict(split_k=split, block_n=bn, block_k=bk)
                    row = {"section": "gemv", "m": m, "k": k, "n": n, "mode": mode, "kernel": "gemv",
                           "split_k": split, "block_n": bn, "block_k": bk}
                    try:
                        got = qgemv_triton(a, sa, w0, sw, None, k, mode, torch.bfloat16, **kw)
                        row["equal"] = bool(torch.equal(got, want))
                        us = time_all([lambda w=w, kw=kw: qgemv_triton(a, sa, w, sw, None, k, mode,
                                                                          torch.bfloat16, **kw) for w in ws], rep=rep)
                    except Exception as e:  # noqa: BLE001 -- out of resources etc.: record and go on
                        row["error"] = str(e)[:200]
                        rows.append(row)
                        continue
                    row.update(us=us, x_bf16=bf16 / us, x_tiled=tiled / us, GBps=wbytes / us * 1e-3,
                               default=(bn, bk, split) == (dn, dk, d_split))
                    rows.append(row)
                    if best is None or us < best["us"]:
                        best = row
                    if row["default"]:
                        dflt = row
                if best is None:
                    continue
                d_us = dflt["us"] if dflt else float("nan")
                bad = sum(1 for r in rows if r.get("kernel") == "gemv" and r.get("equal") is False)
                print(f"{m:>3} {k:>6} {n:>6} {MODE_NAMES[mode]:>5} | {bf16:7.1f} {tiled:7.1f} {best['us']:7.1f} "
                      f"{d_us:7.1f} | {bf16 / best['us']:9.2f} {tiled / best['us']:10.2f} {best['GBps']:6.0f} | "
                      f"({best['split_k']}, {best['block_n']}, {best['block_k']}); "
                      f"({d_split}, {dn}, {dk}){'' if not bad else f'  MISMATCHES SO FAR: {bad}'}", flush=True)
                for bn, bk in GEMV_BLOCKS[mode]:  # the split curve per block choice: us per split
                    mine = [r for r in rows[-60:] if r.get("kernel") == "gemv" and (r["m"], r["k"], r["n"], r["mode"],
                            r["block_n"], r["block_k"]) == (m, k, n, mode, bn, bk) and "us" in r]
                    curve = {r["split_k"]: r["us"] for r in mine}
                    print(f"      BN={bn:<3} BK={bk:<3} split: " + "  ".join(
                        f"{sp}: {us:.1f}" for sp, us in sorted(curve.items())), flush=True)
            save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_gemm.json"))
    ap.add_argument("--sections", default="tiles,gemv", help="comma-separated: tiles (tile sweep), gemv (split-K)")
    ap.add_argument("--gemv-rep", type=int, default=10, help="ms of replay per gemv-section timing")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    rows: list[dict] = []

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"command": " ".join(sys.argv), "env": environment(), "rows": rows}, indent=1))

    if "tiles" in sections:
        probe_tiles(rows)
    if "gemv" in sections:
        probe_gemv(rows, a.gemv_rep, save)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
