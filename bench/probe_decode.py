"""Launch-option sweep of the decode-path kernels on LLaMA-3-8B sizes, and which host ops launch the PyTorch
(non-Triton) kernels of a compiled decode step.

Sections (``--sections``, comma-separated):

* ``gemv``: :func:`flatquant.ops.gemv.qgemv_triton` (W4A4) over BLOCK_N, BLOCK_K, warps, stages and split-K at the
  decode shapes (qkv, o, gate+up, down; 1, 2, 3 and 16 rows), weights rotated through 3x L2; prints the default,
  the best and the HBM floor per shape.
* ``attn``: :func:`flatquant.ops.kv_attention.kv4_decode_attention_triton` at batch 1 and 16 (8 KV heads, 32 query
  heads, 2048 cached positions of a 2304-position cache) over its variants (plain / inline-PTX nibble unpack,
  unswapped / swapped MMA layout: ``ATTN_VARIANTS``) at chosen BLOCK_T, warps and stages (``ATTN_LAUNCHES``) and
  several split counts; prints the default, the best, and the best per variant (about 30 kernel compiles; alone,
  ``--sections attn``, about a minute).
* ``kron``: :func:`flatquant.ops.kron_quant.kron_quant_triton` at 1, 2048 and 32768 tokens for K = 4096 and
  14336 (and the o_proj head mix) over warps, stages and the grid cap.
* ``ops``: torch.profiler of 3 eager-dispatched decode steps of a 2-layer compiled engine; every host op whose
  kernels are PyTorch-native (``at::native``), with its input shapes and the Python line that called it.

Usage (GPU): ``PYTHONPATH=. python bench/probe_decode.py --out bench/results/probe_decode_h200.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402
from timing import copy_bandwidth, graph_time, rotating, time_all  # noqa: E402

from flatquant.core.kron import decompose_dim  # noqa: E402
from flatquant.ops import sm_count  # noqa: E402
from flatquant.ops.gemv import default_blocks, default_split_k, qgemv_triton  # noqa: E402
from flatquant.ops.kron_quant import kron_quant_triton  # noqa: E402
from flatquant.ops.kv_attention import default_launch, default_splits, kv4_decode_attention_triton  # noqa: E402
from flatquant.ops.matmul import MODE_W4A4  # noqa: E402

GEMV_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def sweep_gemv(bw: float) -> list[dict]:
    """Every launch option per decode shape; the default and the best."""
    dev = torch.device("cuda")
    rows = []
    for (name, (n, k)), m in itertools.product(GEMV_SHAPES.items(), (1, 3, 16)):
        ws = rotating(lambda: torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev), n * k // 2)
        sw = torch.rand(n, device=dev)
        a = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, device=dev)
        sa = torch.rand(m, device=dev)
        ref = qgemv_triton(a, sa, ws[0], sw, None, k, MODE_W4A4, torch.bfloat16)
        floor = n * k / 2 / (bw / 2) * 1e6  # read-only bytes at half the copy (read + write) rate
        bn0, bk0 = default_blocks(MODE_W4A4, dev)
        results = []
        for bn, bk, warps, stages in itertools.product((32, 64, 128), (256, 512), (4, 8), (3, 4)):
            base = default_split_k(-(-n // bn), k, bk, sm_count(dev))
            for split in sorted({base, 2 * base}):
                def call(w, bn=bn, bk=bk, warps=warps, stages=stages, split=split):
                    return qgemv_triton(a, sa, w, sw, None, k, MODE_W4A4, torch.bfloat16, split_k=split,
                                        block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
                try:
                    out = call(ws[0])
                    ok = bool(torch.equal(out, ref))
                    us = time_all([lambda w=w, call=call: call(w) for w in ws])
                except Exception as e:  # noqa: BLE001 - a launch option the compiler refuses is a result too
                    results.append({"bn": bn, "bk": bk, "warps": warps, "stages": stages, "split": split,
                                    "error": str(e)[:120]})
                    continue
                results.append({"bn": bn, "bk": bk, "warps": warps, "stages": stages, "split": split, "us": us,
                                "equal": ok, "default": (bn, bk, warps, stages, split) == (bn0, bk0, 4, 4, base)})
        timed = [r for r in results if "us" in r and r["equal"]]
        best = min(timed, key=lambda r: r["us"])
        dflt = next((r for r in timed if r["default"]), None)
        rows.append({"shape": name, "n": n, "k": k, "m": m, "floor_us": floor, "best": best, "default": dflt,
                     "all": results})
        print(f"gemv {name:>8} m={m:>2}: floor {floor:6.1f} µs | default {dflt['us'] if dflt else float('nan'):6.1f}"
              f" | best {best['us']:6.1f} bn={best['bn']} bk={best['bk']} w={best['warps']} s={best['stages']} "
              f"split={best['split']}", flush=True)
    return rows


# Decode-attention variants (launcher keywords) and the (block_t, warps, stages) launches each is timed at; every
# launch also at several split counts. "plain": the per-element shift / mask / integer-to-float unpack (otherwise
# the current kernel, not the one of probe_decode_h200.json); "swar": the inline-PTX unpack; "swap": the swapped
# MMA layout (cache tiles on M, query heads on N).
ATTN_VARIANTS = {
    "plain": {"swar": False, "swap": False},
    "swar": {"swar": True, "swap": False},
    "plain+swap": {"swar": False, "swap": True},
    "swar+swap": {"swar": True, "swap": True},
}
ATTN_LAUNCHES = {
    1: {"plain": [(128, 4, 2), (64, 4, 2)],
        "swar": [(128, 4, 2), (64, 4, 2), (32, 2, 2), (128, 4, 1), (128, 8, 2)],
        "swar+swap": [(128, 4, 2), (64, 4, 2), (64, 4, 1), (32, 2, 2), (128, 4, 1), (128, 8, 2)]},
    16: {"plain": [(64, 4, 2)],
         "plain+swap": [(64, 4, 2)],
         "swar": [(64, 4, 2), (64, 4, 1), (64, 4, 3), (128, 4, 2), (32, 2, 2), (128, 8, 2)],
         "swar+swap": [(64, 4, 2), (64, 4, 1), (64, 4, 3), (128, 4, 2), (128, 4, 1), (32, 2, 1), (32, 2, 2),
                       (64, 2, 1), (128, 8, 2), (32, 1, 1)]},
}
ATTN_PROGRAMS_PER_SM = {1: (1, 2, 4), 16: (2, 3, 4, 6, 8, 16)}  # split counts: default_splits at these targets


def _effective_splits(cap: int, block_t: int, splits: int) -> int:
    """The split count the launcher ends up with (whole tiles per chunk, no empty trailing chunk)."""
    chunk = -(-(-(-cap // splits)) // block_t) * block_t
    return max(1, -(-cap // chunk))


ATTN_SHAPE = (32, 8, 128, 2304, 2048)  # query heads, KV heads, head_dim, cache capacity, cached positions


def sweep_attn(bw: float, device: str = "cuda") -> list[dict]:
    """Decode attention over its variants and launch options at batch 1 and 16 (LLaMA-3-8B heads); the default,
    the best overall and the best per variant. ``equal_plain``: bit-equal to the plain unpack at the same launch
    and layout (where that was timed)."""
    dev = torch.device(device)
    sms = sm_count(dev)
    rows = []
    hq, hkv, d, cap, n = ATTN_SHAPE
    for b in (1, 16):
        t_start = time.perf_counter()
        g = torch.Generator(device=dev).manual_seed(b)
        q = torch.randn(b, hq, d, device=dev, generator=g).bfloat16()
        codes = [torch.randint(0, 256, (b, hkv, cap, d // 2), dtype=torch.uint8, device=dev, generator=g)
                 for _ in range(2)]
        sc = [torch.rand(b, hkv, cap, device=dev, generator=g) * 0.1 for _ in range(4)]
        start = torch.zeros(b, dtype=torch.int32, device=dev)
        length = torch.full((b,), n, dtype=torch.int32, device=dev)
        args = (q, codes[0], sc[0], sc[1], codes[1], sc[2], sc[3], start, length, d ** -0.5)
        ref = kv4_decode_attention_triton(*args, swar=False, swap=False)
        floor = b * hkv * n * (d + 16) / (bw / 2) * 1e6
        plain_out: dict[tuple, torch.Tensor] = {}
        results = []
        for name, launches in ATTN_LAUNCHES[b].items():
            kw = ATTN_VARIANTS[name]
            for bt, warps, stages in launches:
                for split in sorted({_effective_splits(cap, bt, default_splits(b, hkv, cap, bt, sms, pps))
                                     for pps in ATTN_PROGRAMS_PER_SM[b]}):
                    cfg = {"variant": name, "bt": bt, "warps": warps, "stages": stages, "split": split}
                    key = (kw["swap"], bt, warps, stages, split)

                    def call(bt=bt, warps=warps, stages=stages, split=split, kw=kw):
                        return kv4_decode_attention_triton(*args, block_t=bt, splits=split, num_warps=warps,
                                                           num_stages=stages, **kw)
                    try:
                        out = call()
                        err = (out.float() - ref.float()).abs().max().item()
                        us = graph_time(call)
                    except Exception as e:  # noqa: BLE001 - a launch option the compiler refuses is a result too
                        results.append({**cfg, "error": str(e)[:120]})
                        continue
                    if not kw["swar"]:
                        plain_out[key] = out
                    eq = bool(torch.equal(out, plain_out[key])) if kw["swar"] and key in plain_out else None
                    results.append({**cfg, "us": us, "max_err": err, "equal_plain": eq})
        timed = [r for r in results if "us" in r and r["max_err"] < 0.05]
        best = min(timed, key=lambda r: r["us"])
        by_variant = {v: min((r for r in timed if r["variant"] == v), key=lambda r: r["us"])
                      for v in ATTN_LAUNCHES[b] if any(r["variant"] == v for r in timed)}
        dl = default_launch(b, hkv, hq // hkv, sms)
        dflt = {"variant": "swar+swap" if dl.swap else "swar", "bt": dl.block_t, "warps": dl.num_warps,
                "stages": dl.num_stages, "split": _effective_splits(
                    cap, dl.block_t, default_splits(b, hkv, cap, dl.block_t, sms, dl.programs_per_sm))}
        out = kv4_decode_attention_triton(*args)
        dflt["max_err"] = (out.float() - ref.float()).abs().max().item()
        dflt["us"] = dflt_us = graph_time(lambda: kv4_decode_attention_triton(*args))
        rows.append({"batch": b, "floor_us": floor, "default_us": dflt_us, "default": dflt, "best": best,
                     "best_by_variant": by_variant, "all": results})

        def fmt(r: dict) -> str:
            return f"{r['us']:6.1f} {r['variant']} bt={r['bt']} w={r['warps']} s={r['stages']} split={r['split']}"
        print(f"attn b={b:>2}: floor {floor:6.1f} µs | default {fmt(dflt)} | best {fmt(best)} "
              f"({len(results)} launches, {time.perf_counter() - t_start:.0f} s)", flush=True)
        for v, r in by_variant.items():
            print(f"attn b={b:>2}:   best {v:>10}: {fmt(r)}", flush=True)
        bad = [r for r in results if r.get("equal_plain") is False or r.get("max_err", 0) >= 0.05 or "error" in r]
        for r in bad:
            print(f"attn b={b:>2}:   WRONG/FAILED {r}", flush=True)
    return rows


def sweep_kron(bw: float) -> list[dict]:
    """kron_quant over warps, stages and grid cap at decode and prefill token counts."""
    dev = torch.device("cuda")
    rows = []
    for name, k in (("ln", 4096), ("down", 14336), ("o_mix", 4096)):
        n1, n2 = (32, 128) if name == "o_mix" else decompose_dim(k)
        g = torch.Generator(device=dev).manual_seed(k)
        left = torch.linalg.qr(torch.randn(n1, n1, device=dev, generator=g))[0].bfloat16()
        right = None if name == "o_mix" else torch.linalg.qr(torch.randn(n2, n2, device=dev, generator=g))[0].bfloat16()
        clip = torch.tensor([[0.9, 0.95]] * (3 if name == "ln" else 1), device=dev)
        for t in (1, 2048, 32768):
            x = torch.randn(t, k, device=dev, generator=g).bfloat16()
            ref = kron_quant_triton(x, left, right, clip, n1)
            floor = (t * k * 2 + clip.shape[0] * t * k // 2) / (bw / 2) * 1e6
            results = []
            for warps, stages, per_sm in itertools.product((4, 8), (1, 2), (1, 4)):
                progs = per_sm * sm_count(dev)
                try:
                    out = kron_quant_triton(x, left, right, clip, n1, programs=progs, num_warps=warps,
                                            num_stages=stages)
                    ok = bool(torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]))
                    us = graph_time(lambda w=warps, s=stages, p=progs: kron_quant_triton(
                        x, left, right, clip, n1, programs=p, num_warps=w, num_stages=s))
                except Exception as e:  # noqa: BLE001
                    results.append({"warps": warps, "stages": stages, "per_sm": per_sm, "error": str(e)[:120]})
                    continue
                results.append({"warps": warps, "stages": stages, "per_sm": per_sm, "us": us, "equal": ok})
            dflt_us = graph_time(lambda: kron_quant_triton(x, left, right, clip, n1))
            timed = [r for r in results if "us" in r and r["equal"]]
            best = min(timed, key=lambda r: r["us"])
            rows.append({"site": name, "k": k, "tokens": t, "floor_us": floor, "default_us": dflt_us, "best": best,
                         "all": results})
            print(f"kron {name:>6} t={t:>5}: floor {floor:8.1f} µs | default {dflt_us:8.1f} | best {best['us']:8.1f} "
                  f"w={best['warps']} s={best['stages']} per_sm={best['per_sm']}", flush=True)
    return rows


def native_ops() -> list[dict]:
    """Host ops of a compiled 2-layer engine's decode step that launch PyTorch-native kernels."""
    from engine_probe import build

    from flatquant.models.random import LLAMA3_8B

    args = LLAMA3_8B.__class__(**{**LLAMA3_8B.to_dict(), "n_layers": 2})
    model = build(args, fuse=True, compile_decode=True)
    tok = torch.randint(0, args.vocab_size, (1, 64), device="cuda")
    cache = model.new_cache(1, 128)
    model.forward(tok, cache, last_only=True)
    nxt = tok[:, -1:]
    pos = torch.tensor([cache.seen], device="cuda")
    for _ in range(2):
        model.decode_step(nxt, pos, cache)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=True) as prof:
        for _ in range(3):
            model.decode_step(nxt, pos, cache)
        torch.cuda.synchronize()
    agg: dict[tuple, int] = defaultdict(int)
    for e in prof.events():
        kernels = [k.name for k in getattr(e, "kernels", [])]
        if not any("at::native" in k or "at_cuda_detail" in k for k in kernels):
            continue
        stack = [s for s in (e.stack or []) if "flatquant" in s or "torch/_inductor" in s][:4]
        agg[(e.name, str(e.input_shapes)[:160], " <- ".join(stack)[:400], kernels[0][:80])] += 1
    rows = [{"op": k[0], "shapes": k[1], "stack": k[2], "kernel": k[3], "calls": c} for k, c in agg.items()]
    rows.sort(key=lambda r: -r["calls"])
    for r in rows[:30]:
        print(f"native {r['calls']:>4} {r['op']} {r['shapes']} | {r['kernel']} | {r['stack']}", flush=True)
    return rows


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="ops,attn,kron,gemv")
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_decode.json"))
    a = ap.parse_args()
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} copy bandwidth {bw * 1e-9:.0f} GB/s (read + write)", flush=True)
    res: dict = {"command": " ".join(sys.argv), "env": environment(), "copy_GBps": bw * 1e-9}
    fns = {"gemv": sweep_gemv, "attn": sweep_attn, "kron": sweep_kron, "ops": lambda bw: native_ops()}
    for sec in a.sections.split(","):
        res[sec] = fns[sec](bw)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
