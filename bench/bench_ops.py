"""Kernel benchmarks for the real INT4 path on one GPU (H100): GEMMs, full quantized linear, fused kron_quant.

Side by side in one run, per LLaMA-3-8B / LLaMA-2-7B linear shape (K, N) and token count M:
bf16 cuBLAS (``F.linear``), ``torch._int_mm`` (W8A8), fp8 ``torch._scaled_mm``, and ours: W8A8 / W4A8 / W4A4 GEMMs
and the full W4A4 quantized linear (Kronecker transform + LAC + quantize + pack + GEMM). Then the fused kron_quant
op alone against its pure-torch reference and the memory-bandwidth floor (measured copy bandwidth).

Usage: ``python bench/bench_ops.py [--quick] [--out bench/results/ops_h100_all.json]``. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copy_bandwidth, graph_time, rotating, time_all  # noqa: E402

from flatquant.core.kron import decompose_dim
from flatquant.ops import kron_quant, make_qlinear, qlinear, w4a4_matmul, w4a8_matmul, w8a8_matmul
from flatquant.ops import reference as ref
from flatquant.ops.matmul import MODE_W4A4, qmatmul_triton, qmatmul_tuned

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
MS = [1, 16, 64, 256, 2048, 8192, 16384]
def bench_shape(k: int, n: int, ms: list[int], dev: torch.device, first_of_k: bool = True) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(0)
    n1, n2 = decompose_dim(k)
    w = torch.randn(n, k, device=dev, generator=g)
    left = torch.linalg.qr(torch.randn(n1, n1, device=dev, generator=g))[0]
    right = torch.linalg.qr(torch.randn(n2, n2, device=dev, generator=g))[0]
    p4 = make_qlinear(w, left=left, right=right, clip=(0.95, 0.95), a_bits=4, w_bits=4)
    p48 = make_qlinear(w, left=left, right=right, a_bits=8, w_bits=4)
    w_bf16s = rotating(lambda: w.to(torch.bfloat16), n * k * 2)
    w_i8s = rotating(lambda: torch.randint(-127, 127, (n, k), dtype=torch.int8, device=dev), n * k)
    w_fp8s = rotating(lambda: w.to(torch.float8_e4m3fn), n * k)
    w_i4s = rotating(lambda: p4.weight.clone(), n * k // 2)
    w_h4s = rotating(lambda: p48.weight_halves.clone(), n * k // 2)
    sw = p4.w_scale
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
        a8 = torch.randint(-127, 127, (m, k), dtype=torch.int8, device=dev)
        a4, sa = kron_quant(x, p4.left, p4.right, p4.clip, n1, 4, True)
        xf8 = x.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        r = {"K": k, "N": n, "M": m}
        r["bf16"] = time_all([lambda wb=wb: F.linear(x, wb) for wb in w_bf16s])
        r["int_mm"] = (time_all([lambda wi=wi: torch._int_mm(a8, wi.t()) for wi in w_i8s])
                       if m > 16 else float("nan"))
        r["fp8"] = (time_all([lambda wf=wf: torch._scaled_mm(xf8, wf.t(), one, one, out_dtype=torch.bfloat16)
                                  for wf in w_fp8s]) if m % 16 == 0 else float("nan"))
        r["ours_w8a8"] = time_all([lambda wi=wi: w8a8_matmul(a8, sa, wi, sw, None, torch.bfloat16)
                                       for wi in w_i8s])
        r["ours_w4a8"] = time_all([lambda wh=wh: w4a8_matmul(a8, sa, wh, sw, None, torch.bfloat16)
                                       for wh in w_h4s])
        r["ours_w4a4"] = time_all([lambda wq=wq: w4a4_matmul(a4, sa, wq, sw, None, torch.bfloat16)
                                       for wq in w_i4s])
        # the fused-unpack W4A4 kernel alone (the op switches to unpack + W8A8 at M >= UNPACK_MIN_M)
        r["ours_w4a4_fused"] = time_all([lambda wq=wq: qmatmul_triton(a4, sa, wq, sw, None, k, MODE_W4A4,
                                                                       torch.bfloat16) for wq in w_i4s])
        ps = [make_like(p4, wq) for wq in w_i4s]
        r["ours_qlinear"] = time_all([lambda pp=pp: qlinear(x, pp, "real") for pp in ps])
        r["kron_quant"] = graph_time(lambda: kron_quant(x, p4.left, p4.right, p4.clip, n1, 4, True))
        # the torch reference depends on K and M only: timed once per (K, M)
        r["kron_quant_torch"] = (
            graph_time(lambda: ref.kron_quant_ref(x, p4.left, p4.right, p4.clip[0], p4.clip[1], n1))
            if first_of_k else float("nan"))
        r["best_config_w4a4"] = str(qmatmul_tuned.best_config)
        ops = 2 * m * n * k
        r["tops_w4a4"] = ops / r["ours_w4a4"] * 1e-6
        r["tops_bf16"] = ops / r["bf16"] * 1e-6
        rows.append(r)
        print(f"  K={k} N={n} M={m}: bf16 {r['bf16']:.1f}us w4a4 {r['ours_w4a4']:.1f}us "
              f"qlinear {r['ours_qlinear']:.1f}us [{r['best_config_w4a4']}]", file=sys.stderr, flush=True)
    return rows


def make_like(p, weight):
    """The same QLinearParams with another weight buffer (cache rotation)."""
    import dataclasses

    return dataclasses.replace(p, weight=weight)


def check(dev: torch.device) -> dict:
    """Quick native correctness: Triton vs reference on a LLaMA-ish shape."""
    g = torch.Generator(device=dev).manual_seed(1)
    m, k, n = 300, 4096, 1000
    n1, n2 = decompose_dim(k)
    x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
    x[3] = 0
    x[:, 7] *= 50
    left = torch.randn(n1, n1, device=dev, generator=g).to(torch.bfloat16) / 8
    right = torch.randn(n2, n2, device=dev, generator=g).to(torch.bfloat16) / 8
    clip = torch.tensor([0.9, 0.95], device=dev)
    c, s = kron_quant(x, left, right, clip, n1)
    cr, sr = ref.kron_quant_ref(x, left, right, clip[0], clip[1], n1)
    codes = ref.unpack_int4_ref(c).int()
    codes_r = ref.unpack_int4_ref(cr).int()
    wq = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
    sw = torch.rand(n, device=dev) + 0.5
    out = w4a4_matmul(c, s, ref.pack_int4_ref(wq), sw, None, torch.bfloat16)
    out_r = ref.int_matmul_ref(ref.unpack_int4_ref(c), wq, s, sw, None, torch.bfloat16)
    return {
        "kron_quant_codes_mismatch": int((codes != codes_r).sum()),
        "kron_quant_codes_maxdiff": int((codes - codes_r).abs().max()),
        "kron_quant_scale_maxrel": float(((s - sr).abs() / sr).max()),
        "w4a4_equal": bool(torch.equal(out, out_r)),
        "w4a4_maxabs": float((out.float() - out_r.float()).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="two shapes, three token counts")
    ap.add_argument("--out", default="bench/results/ops_h100_all.json")
    ap.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default: all)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes, ms = (SHAPES[:2], [1, 2048, 16384]) if args.quick else (SHAPES, MS)
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    t0 = time.time()
    info = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "command": " ".join(["python"] + sys.argv),
    }
    info["check"] = check(dev)
    print(json.dumps(info["check"]), file=sys.stderr, flush=True)
    bw = copy_bandwidth()
    info["copy_bandwidth_GBps"] = bw * 1e-9
    rows = []
    seen_k: set[int] = set()
    for k, n in shapes:
        rows += bench_shape(k, n, ms, dev, first_of_k=k not in seen_k)
        seen_k.add(k)
    for r in rows:
        m, k = r["M"], r["K"]
        r["kron_quant_floor"] = (m * k * 2 + m * k // 2 + 4 * m) / bw * 1e6
    info["rows"] = rows
    info["seconds"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)

    print(f"# {info['gpu']}  torch {info['torch']}  triton {info['triton']}  copy {bw * 1e-9:.0f} GB/s")
    print("# times in us (median); x = speed-up of ours over the baseline (>1 is faster); w4a4 = the op "
          "(unpack + W8A8 kernel at M >= UNPACK_MIN_M), fused = the fused-unpack W4A4 kernel")
    hdr = (f"{'K':>6} {'N':>6} {'M':>6} | {'bf16':>8} {'int_mm':>8} {'fp8':>8} | {'w8a8':>8} {'w4a8':>8} {'w4a4':>8}"
           f" {'fused':>8} {'qlin':>8} | {'w4a4/bf16':>9} {'w4a4/i8':>8} {'qlin/bf16':>9} {'kq%':>5} {'TOPS':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>6} | {r['bf16']:8.1f} {r['int_mm']:8.1f} {r['fp8']:8.1f} | "
              f"{r['ours_w8a8']:8.1f} {r['ours_w4a8']:8.1f} {r['ours_w4a4']:8.1f} {r['ours_w4a4_fused']:8.1f} "
              f"{r['ours_qlinear']:8.1f} | "
              f"{r['bf16'] / r['ours_w4a4']:9.2f} {r['int_mm'] / r['ours_w4a4']:8.2f} "
              f"{r['bf16'] / r['ours_qlinear']:9.2f} {100 * r['kron_quant'] / r['ours_qlinear']:5.1f} "
              f"{r['tops_w4a4']:6.0f}")
    print("\n# fused kron_quant (Kronecker transform + LAC + int4 quantize + pack), per K and M")
    print(f"{'K':>6} {'M':>6} | {'ours':>8} {'torch':>8} {'floor':>8} | {'torch/ours':>10} {'floor/ours':>10}")
    seen = set()
    for r in rows:
        if (r["K"], r["M"]) in seen:
            continue
        seen.add((r["K"], r["M"]))
        print(f"{r['K']:>6} {r['M']:>6} | {r['kron_quant']:8.1f} {r['kron_quant_torch']:8.1f} "
              f"{r['kron_quant_floor']:8.1f} | {r['kron_quant_torch'] / r['kron_quant']:10.2f} "
              f"{r['kron_quant_floor'] / r['kron_quant']:10.2f}")


if __name__ == "__main__":
    main()
