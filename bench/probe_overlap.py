"""Does the prefill's int4 weight unpack hide behind the int8 GEMMs when a second stream runs it?

Per layer of the LLaMA-3-8B engine at ``M`` tokens: four int8 GEMMs (fused qkv, o, gate/up, down,
``int8_gemm_triton`` as the engine calls it), each on weights stored packed (two codes per byte) that are unpacked
to int8 first. Three schedules, each captured in one CUDA graph over ``--layers`` layers:

* ``serial``: unpack, then GEMM, projection by projection on one stream (the engine today);
* ``overlap``: a side stream unpacks layer l+1's four weights into the other half of a double buffer while the
  main stream runs layer l's GEMMs (events order the two);
* ``gemm_only``: the GEMMs on weights unpacked beforehand (the floor the overlap can reach).

The outputs of ``overlap`` are checked against ``serial``'s.

Usage (GPU): ``python bench/probe_overlap.py --out bench/results/probe_overlap_h200.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402
from timing import graph_time  # noqa: E402

from flatquant.ops.matmul import int8_gemm_triton  # noqa: E402
from flatquant.ops.pack import unpack_int4_triton  # noqa: E402

PROJ = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N) of qkv, o, gate/up, down


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/probe_overlap.json"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 32768])
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    dev = torch.device("cuda")
    n_layers = a.layers
    g = torch.Generator(device=dev).manual_seed(0)
    packed = [[torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=g) for k, n in PROJ]
              for _ in range(n_layers)]
    w_scale = [torch.rand(n, device=dev, generator=g) for _, n in PROJ]
    bufs = [[torch.empty(n, k, dtype=torch.int8, device=dev) for k, n in PROJ] for _ in range(2)]
    unpacked = [[unpack_int4_triton(p) for p in layer] for layer in packed]
    side = torch.cuda.Stream(dev)
    rows = []
    for m in a.tokens:
        acts = {k: torch.randint(-8, 8, (m, k), dtype=torch.int8, device=dev, generator=g) for k in (4096, 14336)}
        a_scale = torch.rand(m, device=dev, generator=g)

        def gemms(weights: list[Tensor], acts: dict = acts, a_scale: Tensor = a_scale) -> list[Tensor]:
            return [int8_gemm_triton(acts[k], a_scale, w8, w_scale[j], None, torch.bfloat16)
                    for j, ((k, _), w8) in enumerate(zip(PROJ, weights, strict=True))]

        def serial() -> list[Tensor]:
            out: list[Tensor] = []
            for layer in packed:
                out = gemms([unpack_int4_triton(p, out=b) for p, b in zip(layer, bufs[0], strict=True)])
            return out

        def overlap() -> list[Tensor]:
            main = torch.cuda.current_stream(dev)
            ready = [torch.cuda.Event() for _ in range(n_layers)]
            free = [torch.cuda.Event() for _ in range(n_layers)]
            side.wait_stream(main)
            out: list[Tensor] = []
            for layer in range(n_layers):
                with torch.cuda.stream(side):
                    for nxt in ([0, 1] if layer == 0 else [layer + 1]):
                        if nxt >= n_layers:
                            continue
                        if nxt >= 2:
                            side.wait_event(free[nxt - 2])  # the GEMMs of layer nxt - 2 read this half
                        for p, b in zip(packed[nxt], bufs[nxt % 2], strict=True):
                            unpack_int4_triton(p, out=b)
                        ready[nxt].record(side)
                main.wait_event(ready[layer])
                out = gemms(bufs[layer % 2])
                free[layer].record(main)
            main.wait_stream(side)
            return out

        def gemm_only() -> list[Tensor]:
            out: list[Tensor] = []
            for layer in unpacked:
                out = gemms(layer)
            return out

        want, got = serial(), overlap()
        torch.cuda.synchronize()
        equal = all(torch.equal(x, y) for x, y in zip(want, got, strict=True))
        res = {name: graph_time(fn) / n_layers for name, fn in
               (("serial", serial), ("overlap", overlap), ("gemm_only", gemm_only))}
        rows.append({"m": m, "layers": n_layers, "us_per_layer": res, "overlap_equals_serial": equal})
        print(f"M={m}: per layer serial {res['serial']:.1f} us, overlap {res['overlap']:.1f} us, GEMMs alone "
              f"{res['gemm_only']:.1f} us; hidden {res['serial'] - res['overlap']:.1f} of "
              f"{res['serial'] - res['gemm_only']:.1f} us; equal {equal}", flush=True)
    write_json(a.out, {"command": " ".join(sys.argv), "env": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
