"""kron_quant kernel layouts side by side on LLaMA-3-8B sizes: ``whole`` (one program holds a token's whole
transform), ``chunked`` (column blocks parked in an L2-resident workspace) and ``split`` (few tokens: column blocks
on separate programs + a finishing kernel), with block widths and warp counts, and at prefill the pipelined layouts
and ``multi_token`` (blocks of 1 / 2 / 4 tokens, register prefetch or cp.async stages, 4 / 8 warps, 1 / 2 / 4
programs per SM), against the HBM floor (read x, write the codes). Every layout's codes are compared with
``whole``'s. A configuration that cannot launch (e.g. more shared memory than an SM has) is recorded with its error.

Usage (GPU): ``python bench/probe_kron.py --out bench/results/probe_kron_h200.json`` (about 3 minutes);
``--sites`` and ``--variants`` (comma-separated) restrict the sites and layouts, e.g. for the prefill layouts
``--sites down14336glu,kron14336 --tokens 2048 32768 --variants whole,pipelined,pipelined_fastq``; the multi-token
layout against pipelined_fastq (about 3 minutes): ``--sites kron14336,kron11008,down14336glu,kron4096 --tokens 2048
32768 --variants pipelined_fastq,multi_token``; the row-split layout (``multi_token_split``: 86 -> 64 + 32 and
112 -> 64 + 32 + 16 rows instead of 128; the default at 86 rows) beside multi_token at its default launch only
(about 2 minutes): ``--default-launch --sites kron11008,down11008glu,kron14336,down14336glu --tokens 2048 32768
--variants multi_token,multi_token_split``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402
from timing import copy_bandwidth, graph_time  # noqa: E402

from flatquant.core.kron import decompose_dim  # noqa: E402
from flatquant.ops import sm_count, unpack_int4  # noqa: E402
from flatquant.ops.kron_quant import default_variant, kron_quant_triton, row_split_blocks  # noqa: E402

# (name, K, left only, SwiGLU input): the ln/up_gate transforms (4096), down (14336, also fed gate and up; LLaMA-2's
# 11008), o_proj's head mixing
SITES = [("kron4096", 4096, False, False), ("kron11008", 11008, False, False), ("kron14336", 14336, False, False),
         ("down14336glu", 14336, False, True), ("down11008glu", 11008, False, True),
         ("headmix32x128", 4096, True, False)]


# multi_token at prefill: (block_tokens, prefetch, num_stages, num_warps, programs per SM). Offline sm_90 compile
# (Triton 3.6) at 128 x 128 tiles: 8 warps hold 1-2 tokens per block without (or with little) spilling, one program
# per SM (>= 211 registers); without prefetch the loads go through cp.async stages in shared memory (3 stages of
# two tokens exceed an SM's shared memory: 2; with the SwiGLU input 2 do too: recorded as failed). At 64 x 64 tiles
# (K = 4096, 182-213 registers at 4 warps) two programs fit an SM.
MULTI_TOKEN_128 = [(1, False, 3, 8, 1), (2, True, 1, 8, 1), (2, True, 1, 8, 4), (2, False, 2, 8, 1),
                   (4, True, 1, 8, 1), (2, True, 1, 4, 2)]
MULTI_TOKEN_64 = [(2, True, 1, 4, 2), (4, True, 1, 4, 2), (2, False, 3, 4, 2), (4, True, 1, 8, 1), (4, True, 1, 8, 4)]
# multi_token_split (one token per block, n1's rows in blocks of 64 + 32 [+ 16] at 128 x 128 tiles): (num_stages,
# num_warps, programs per SM). Offline sm_90 compile (Triton 3.6), 8 warps, 3 stages: 195 registers (86 rows) / 212
# (112), no spills, 132 / 148 KiB shared memory (176 / 200 KiB with the SwiGLU input): one program per SM. 4 warps,
# 2 stages, 86 rows: 255 registers with 124 bytes of spills and 108 KiB, so two programs fit an SM (two tokens in
# flight); with the SwiGLU input (128 KiB) or at 112 rows (120 KiB, 392 bytes of spills) they do not.
MULTI_TOKEN_SPLIT = [(3, 8, 1), (2, 8, 1), (2, 4, 2)]


def configs(m: int, sms: int, small: bool = False, row_split: bool = False, default_launch: bool = False) -> list[dict]:
    """Launch settings to try at ``m`` tokens (``sms``: the device's SM count, for multi_token's grid; ``small``:
    factor tiles of at most 64 x 64; ``row_split``: n1 leaves a row block of its padded tile unused, so that
    multi_token_split differs from multi_token; ``default_launch``: multi_token at its first (default) launch
    only)."""
    out: list[dict] = [{"variant": "whole", "num_warps": w} for w in (4, 8)]
    out += [{"variant": "chunked", "block_cols": b, "num_warps": w} for b in (32, 64) for w in (4, 8)]
    if m > 16:
        out += [{"variant": "two_pass", "num_warps": w} for w in (4, 8)]
    if m > 64:
        out += [{"variant": v, "num_warps": w} for v in ("pipelined", "pipelined_fastq") for w in (4, 8)]
        launches = (MULTI_TOKEN_64 if small else MULTI_TOKEN_128)[:1 if default_launch else None]
        out += [{"variant": "multi_token", "block_tokens": tb, "prefetch": pf, "num_stages": st, "num_warps": w,
                 "programs": per_sm * sms} for tb, pf, st, w, per_sm in launches]
        if row_split:
            out += [{"variant": "multi_token_split", "num_stages": st, "num_warps": w, "programs": per_sm * sms}
                    for st, w, per_sm in MULTI_TOKEN_SPLIT]
    if m <= 64:
        out += [{"variant": "split", "block_cols": b, "num_warps": w} for b in (16, 32, 64) for w in (4, 8)]
    return out


def _describe(cfg: dict) -> str:
    """One configuration in a few characters: layout / block / warps (multi_token: tokens per block, prefetch or
    stages, warps, programs)."""
    if cfg["variant"] == "multi_token":
        load = "pf" if cfg["prefetch"] else f"st{cfg['num_stages']}"
        return f"multi_token/tb{cfg['block_tokens']}/{load}/{cfg['num_warps']}w/p{cfg['programs']}"
    if cfg["variant"] == "multi_token_split":
        return f"multi_token_split/st{cfg['num_stages']}/{cfg['num_warps']}w/p{cfg['programs']}"
    return f"{cfg['variant']}/{cfg.get('block_cols', '-')}/{cfg['num_warps']}w"


def _glu_vs_torch(got: tuple, x: torch.Tensor, up: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None,
                  clip: torch.Tensor, n1: int) -> dict:
    """The in-kernel SwiGLU input against eager PyTorch's: ``got`` (codes, scales of ``whole`` fed gate and up)
    against the same layout fed ``silu(x) * up`` computed by torch: how many 4-bit codes differ, by how much at
    most, and the largest relative scale difference."""
    plain = kron_quant_triton(torch.nn.functional.silu(x) * up, left, right, clip, n1, variant="whole")
    diff = (unpack_int4(got[0]).int() - unpack_int4(plain[0]).int()).abs()
    return {"codes_differ": int((diff > 0).sum()), "max_code_diff": int(diff.max()), "codes": diff.numel(),
            "max_scale_rel_diff": float(((got[1] - plain[1]).abs() / plain[1]).max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_kron.json"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 2048, 32768])
    ap.add_argument("--sites", default=",".join(name for name, *_ in SITES),
                    help="comma-separated site names to probe (default: all)")
    ap.add_argument("--variants", default=None, help="comma-separated layouts to time (default: all of configs())")
    ap.add_argument("--default-launch", action="store_true",
                    help="multi_token at its default launch only (one token per block, 3 stages, 8 warps, one "
                         "program per SM), not the sweep of MULTI_TOKEN_128 / MULTI_TOKEN_64")
    a = ap.parse_args()
    sites = a.sites.split(",")
    unknown = set(sites) - {name for name, *_ in SITES}
    if unknown:
        ap.error(f"unknown sites {sorted(unknown)}")
    variants = None if a.variants is None else set(a.variants.split(","))
    dev = torch.device("cuda")
    sms = sm_count(dev)
    bw = copy_bandwidth()
    rows: list[dict] = []
    env = environment()

    def save(complete: bool) -> None:
        write_json(a.out, {"command": " ".join(sys.argv), "env": env, "copy_GBps": bw * 1e-9, "complete": complete,
                           "rows": rows})

    print(f"# copy bandwidth {bw * 1e-9:.0f} GB/s")
    for name, k, left_only, glu in SITES:
        if name not in sites:
            continue
        if left_only:
            n1, n2 = 32, k // 32
        else:
            n1, n2 = decompose_dim(k)
        g = torch.Generator(device=dev).manual_seed(k)
        left = torch.linalg.qr(torch.randn(n1, n1, device=dev, generator=g))[0].bfloat16().contiguous()
        right = None if left_only else torch.linalg.qr(torch.randn(n2, n2, device=dev, generator=g))[0].bfloat16()
        right = None if right is None else right.contiguous()
        clip = torch.tensor([0.9, 0.95], device=dev)
        for m in a.tokens:
            x = torch.randn(m, k, device=dev, generator=g).bfloat16()
            up = torch.randn(m, k, device=dev, generator=g).bfloat16() if glu else None
            base = kron_quant_triton(x, left, right, clip, n1, up=up, variant="whole")
            glu_check = None if up is None else _glu_vs_torch(base, x, up, left, right, clip, n1)
            floor = (m * k * (4 if glu else 2) + m * k // 2 + 4 * m) / bw * 1e6
            dflt = default_variant(m, n1, n2)
            t_def = graph_time(lambda: kron_quant_triton(x, left, right, clip, n1, up=up))
            res = []
            failed = []
            split = row_split_blocks(n1, triton.next_power_of_2(n1)) > 0
            for cfg in configs(m, sms, small=max(n1, n2) <= 64, row_split=split,
                               default_launch=a.default_launch):
                if variants is not None and cfg["variant"] not in variants:
                    continue
                try:
                    out = kron_quant_triton(x, left, right, clip, n1, up=up, **cfg)
                    equal = bool(torch.equal(out[0], base[0]) and torch.equal(out[1], base[1]))
                    us = graph_time(lambda cfg=cfg: kron_quant_triton(x, left, right, clip, n1, up=up, **cfg))
                except Exception as e:  # e.g. triton's OutOfResources: recorded, the sweep goes on
                    failed.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                res.append({**cfg, "us": us, "equal": equal})
            if not res:
                continue
            best = min(res, key=lambda r: r["us"])
            rows.append({"site": name, "k": k, "n1": n1, "n2": n2, "m": m, "floor_us": floor, "default": dflt,
                         "default_us": t_def, "best": best, "all": res, "failed": failed, "glu_vs_torch": glu_check})
            save(False)  # after every row: a time limit never loses what was measured
            whole = min((r["us"] for r in res if r["variant"] == "whole"), default=float("nan"))
            print(f"{name:>14} m={m:>6} | default {dflt:>7} {t_def:9.1f} us | whole {whole:9.1f} | best "
                  f"{_describe(best)} {best['us']:9.1f} | floor {floor:7.1f} ({floor / best['us']:.2f}) | all equal "
                  f"{all(r['equal'] for r in res)} | failed {len(failed)}"
                  + ("" if glu_check is None else f" | SwiGLU in-kernel vs torch: {glu_check['codes_differ']} codes "
                     f"differ (max {glu_check['max_code_diff']})"), flush=True)
            for r in sorted(res, key=lambda r: r["us"]):
                if r["variant"] in ("pipelined_fastq", "multi_token", "multi_token_split"):
                    print(f"{'':>16}{_describe(r):<44} {r['us']:9.1f} us ({floor / r['us']:.2f} of floor) equal "
                          f"{r['equal']}", flush=True)
    save(True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
