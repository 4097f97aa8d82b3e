"""Quick probe of the real W4A4KV4 engine on a LLaMA-3-8B-shaped random model: prefill and CUDA-graph decode
times, plus a per-kernel profile of one decode step and one prefill (torch.profiler, kernels summed by name).

Usage (GPU): ``PYTHONPATH=. python bench/engine_probe.py --out bench/results/engine_probe.json``.
This is the engine developer's inner-loop tool; ``bench/bench_e2e.py`` is the side-by-side benchmark.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402

from flatquant.models.args import ModelArgs  # noqa: E402
from flatquant.models.random import LLAMA3_8B, random_real_tensors  # noqa: E402
from flatquant.models.real import (  # noqa: E402
    RealConfig,
    RealModel,
    RealWeights,
    layer_from_tensors,
)
from flatquant.models.real.graphs import CUDAGraphDecoder, CUDAGraphPrefill  # noqa: E402
from flatquant.presets import bits_preset  # noqa: E402

log = logging.getLogger("engine_probe")


def build(args: ModelArgs, *, fuse: bool, compile_decode: bool) -> RealModel:
    """A random real model on the GPU."""
    top, layers = random_real_tensors(args, generator=torch.Generator().manual_seed(0), device="cuda")
    cfg = RealConfig(args=args, qcfg=bits_preset("w4a4kv4"), dtype=torch.bfloat16, fuse=fuse)
    return RealModel(RealWeights(cfg=cfg, top=top, layers=tuple(layer_from_tensors(t, cfg) for t in layers)),
                     compile_decode=compile_decode)


def kernel_table(prof: torch.profiler.profile, n_layers: int, top: int = 25) -> list[dict]:
    """GPU kernels summed by name: calls, total µs, µs per layer."""
    agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            agg[e.name][0] += 1
            agg[e.name][1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    rows = [{"kernel": k[:90], "calls": int(c), "total_us": t, "us_per_layer": t / n_layers}
            for k, (c, t) in agg.items()]
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows)
    return [{"kernel": "TOTAL", "calls": sum(r["calls"] for r in rows), "total_us": total,
             "us_per_layer": total / n_layers}] + rows[:top]


def md(rows: list[dict]) -> str:
    """Markdown table of a kernel table."""
    out = ["| kernel | calls | total µs | µs/layer |", "|---|---|---|---|"]
    out += [f"| {r['kernel']} | {r['calls']} | {r['total_us']:.0f} | {r['us_per_layer']:.1f} |" for r in rows]
    return "\n".join(out)


def decode_ms(dec: CUDAGraphDecoder, logits: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Greedy graph-replayed decode from ``logits``: ms per step over ``steps`` after 3 warm-up steps, last tokens."""
    nxt = logits.argmax(-1)
    for _ in range(3):
        nxt = dec.step(nxt).argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = dec.step(nxt).argmax(-1)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps, nxt


@torch.no_grad()
def run(model: RealModel, batch: int, prefill: int, decode: int, profile: bool) -> dict:
    """Prefill median of 3 (after a warm-up), CUDA-graph decode ms/step, optional kernel tables."""
    args = model.cfg.args
    tok = torch.randint(0, args.vocab_size, (batch, prefill), device="cuda")
    times = []
    for i in range(4):
        cache = model.static_cache(batch, prefill + decode + 8)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model.prefill_graphed(tok, cache)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    dec = model.graphed_decoder(cache)
    step_ms, nxt = decode_ms(dec, logits, decode)
    r = {"batch": batch, "prefill_ms": 1e3 * statistics.median(times), "decode_ms_per_step": step_ms,
         "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "kv_bytes": cache.nbytes()}
    if profile:
        pos = torch.tensor([cache.seen], device="cuda")
        model.decode_step(nxt[:, None], pos, cache)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model.decode_step(nxt[:, None], pos, cache)
            torch.cuda.synchronize()
        r["decode_kernels"] = kernel_table(prof, 3 * args.n_layers)
        model.forward(tok, model.new_cache(batch, prefill + 2), last_only=True)  # compile / autotune outside
        cache = model.new_cache(batch, prefill + 2)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.forward(tok, cache, last_only=True)
            torch.cuda.synchronize()
        r["prefill_kernels"] = kernel_table(prof, args.n_layers)
    return r


def _setting(spec: str) -> dict[str, str]:
    """``"PDL=1,PF=2"`` -> the environment variables of that launch setting."""
    names = {"PDL": "FLATQUANT_PDL", "PF": "FLATQUANT_GEMV_PREFETCH"}
    return {names[k]: v for k, v in (kv.split("=") for kv in spec.split(",") if kv)}


@torch.no_grad()
def launch_ab(model: RealModel, batch: int, prefill: int, decode: int, specs: list[str], rounds: int = 2) -> list[dict]:
    """Decode ms/step (and graphed prefill ms) of the same model under several launch settings, side by side:
    each setting captures its own CUDA graphs (kernels launched with that setting), and the settings run in
    order, then in reverse order, and so on for ``rounds``; each reported figure is the median over rounds."""
    args = model.cfg.args
    tok = torch.randint(0, args.vocab_size, (batch, prefill), device="cuda")
    cache = model.new_cache(batch, prefill + decode + 16)
    graphs: dict[str, tuple[CUDAGraphPrefill, CUDAGraphDecoder]] = {}
    times: dict[str, dict[str, list[float]]] = {s: {"decode": [], "prefill": []} for s in specs}
    for rnd in range(rounds):
        for spec in specs if rnd % 2 == 0 else specs[::-1]:
            env = _setting(spec)
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                if spec not in graphs:
                    cache.seen = 0
                    pre = CUDAGraphPrefill(model, batch, prefill, cache)
                    cache.seen = prefill
                    graphs[spec] = (pre, CUDAGraphDecoder(model, cache))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k)
                    else:
                        os.environ[k] = v
            pre, dec = graphs[spec]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = pre.run(tok)
            torch.cuda.synchronize()
            times[spec]["prefill"].append(1e3 * (time.perf_counter() - t0))
            times[spec]["decode"].append(decode_ms(dec, logits, decode)[0])
    return [{"batch": batch, "setting": s, "prefill_ms": statistics.median(t["prefill"]),
             "decode_ms_per_step": statistics.median(t["decode"]), "decode_all": t["decode"]}
            for s, t in times.items()]


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--variants", default="fast,unfused-eager")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--launch-ab", default="", help="';'-separated launch settings to compare on the fast engine, "
                    "e.g. 'PDL=0;PDL=1,PF=0;PDL=1,PF=2' (PDL: programmatic dependent launch, PF: GEMV L2 prefetch "
                    "tiles); replaces the variant runs")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = ModelArgs(**{**LLAMA3_8B.to_dict(), "n_layers": a.layers})
    variants = {"fast": dict(fuse=True, compile_decode=True), "unfused-eager": dict(fuse=False, compile_decode=False),
                "fused-eager": dict(fuse=True, compile_decode=False)}
    result: dict = {"env": environment(), "command": " ".join(sys.argv), "rows": []}
    if a.launch_ab:
        model = build(args, fuse=True, compile_decode=True)
        print("| batch | setting | prefill ms | decode ms/step | decode per round |\n|---|---|---|---|---|")
        for b in [int(x) for x in a.batches.split(",")]:
            for r in launch_ab(model, b, a.prefill, a.decode, a.launch_ab.split(";")):
                result["rows"].append(r)
                print(f"| {b} | {r['setting']} | {r['prefill_ms']:.2f} | {r['decode_ms_per_step']:.4f} | "
                      f"{' '.join(f'{x:.4f}' for x in r['decode_all'])} |", flush=True)
        write_json(a.out, result)
        return 0
    for v in a.variants.split(","):
        model = build(args, **variants[v])
        for b in [int(x) for x in a.batches.split(",")]:
            torch.cuda.reset_peak_memory_stats()
            r = {"variant": v, **run(model, b, a.prefill, a.decode, a.profile)}
            result["rows"].append(r)
            log.info("%s b%d: prefill %.1f ms, decode %.3f ms/step, peak %.2f GB", v, b, r["prefill_ms"],
                     r["decode_ms_per_step"], r["peak_gb"])
            for k in ("decode_kernels", "prefill_kernels"):
                if k in r:
                    print(f"\n### {v} batch {b} {k}\n" + md(r[k]))
        del model
        torch.cuda.empty_cache()
    print("\n| variant | batch | prefill ms | decode ms/step | peak GB |\n|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['variant']} | {r['batch']} | {r['prefill_ms']:.1f} | {r['decode_ms_per_step']:.3f} | "
              f"{r['peak_gb']:.2f} |")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
