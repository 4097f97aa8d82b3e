"""Layer-parallel calibration of a random model under ``torchrun``: wall time, per-rank time and peak memory,
and a bit-identity check between runs with different process counts.

    torchrun --nproc-per-node 1 bench/bench_layer_parallel.py --layers 4 --epochs 5 --tag _w1
    torchrun --nproc-per-node 2 bench/bench_layer_parallel.py --layers 4 --epochs 5 --tag _w2
    python bench/bench_layer_parallel.py --compare bench/results/layer_parallel_llama3-8b_5ep_w1 \\
        bench/results/layer_parallel_llama3-8b_5ep_w2

Every rank builds the same random model (seeded; vocab 16, so the embeddings cost nothing) and the same random
calibration tokens, then runs :func:`flatquant.calib.distributed.calibrate_parallel` (each rank trains a
contiguous block of layers after recomputing its FP inputs). Rank 0 writes ``transforms.safetensors`` and
``bench.json`` (wall time, each rank's seconds and peak GPU memory, the settings, the environment) into
``bench/results/layer_parallel_<shape>_<epochs>ep<tag>/``. ``--compare A B`` reports whether two such folders
hold bit-identical transforms (and the largest difference where not).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.calib.config import CalibConfig  # noqa: E402
from flatquant.calib.distributed import calibrate_parallel, init_distributed  # noqa: E402
from flatquant.calib.methods import method_config  # noqa: E402
from flatquant.models.args import ModelArgs  # noqa: E402
from flatquant.models.random import LLAMA3_8B, random_weights  # noqa: E402
from flatquant.presets import bits_preset  # noqa: E402

log = logging.getLogger("bench_layer_parallel")
LLAMA3_70B = ModelArgs(vocab_size=128256, hidden=8192, intermediate=28672, n_layers=80, n_heads=64, n_kv_heads=8,
                       head_dim=128, rms_eps=1e-5)
SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B,
          "tiny": ModelArgs(vocab_size=16, hidden=64, intermediate=128, n_layers=4, n_heads=4, n_kv_heads=2,
                            head_dim=16)}  # CPU smoke runs


def compare(a: Path, b: Path) -> int:
    """Print whether two transform files are bit-identical; exit status 0 when they are."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(Path(a) / "transforms.safetensors")), load_file(str(Path(b) / "transforms.safetensors"))
    if ta.keys() != tb.keys():
        print(f"different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
        return 1
    diff = {k: (ta[k].double() - tb[k].double()).abs().max().item() for k in ta if not torch.equal(ta[k], tb[k])}
    print(f"{len(ta)} tensors, {len(ta) - len(diff)} bit-identical" +
          (f"; largest |diff| {max(diff.values()):.3g} in {max(diff, key=diff.get)}" if diff else ""))
    return 0 if not diff else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--compare", nargs=2, type=Path, default=None, metavar=("A", "B"))
    ap.add_argument("--nondeterministic", action="store_true",
                    help="CalibConfig(deterministic=False): the default CUDA kernels (flash-attention backward with "
                         "atomic adds); runs then differ from each other, layer-parallel or not")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world, dev = init_distributed(torch.device(a.device))
    shape = ModelArgs(**{**SHAPES[a.shape].to_dict(), "n_layers": a.layers, "vocab_size": 16})
    w = random_weights(shape, generator=torch.Generator().manual_seed(0), outlier_channels=8, dtype=torch.bfloat16)
    toks = torch.randint(0, 16, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(1))
    ccfg = CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, epochs=a.epochs, batch_size=a.batch_size,
                       compile=a.compile, deterministic=not a.nondeterministic)
    q, t = bits_preset("w4a4kv4"), method_config("flatquant")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    flats, prov = calibrate_parallel(w, toks, q, t, ccfg, device=dev)
    mine = {"rank": rank, "seconds": time.perf_counter() - t0,
            "peak_alloc_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    wall = time.perf_counter() - t0
    if rank == 0:
        from safetensors.torch import save_file

        out = Path(a.out) / f"layer_parallel_{a.shape}_{a.epochs}ep{a.tag}"
        out.mkdir(parents=True, exist_ok=True)
        save_file({f"layers.{i}.{k}": v.contiguous() for i, f in enumerate(flats) for k, v in f.items()},
                  str(out / "transforms.safetensors"))
        res = {"shape": a.shape, "layers": a.layers, "world_size": world, "wall_s": wall, "ranks": ranks,
               "provenance": prov, "settings": ccfg.to_dict(), "deterministic": not a.nondeterministic,
               "command": " ".join(sys.argv), "env": environment()}
        (out / "bench.json").write_text(json.dumps(res, indent=1))
        print(f"{a.shape} {a.layers} layers, {a.epochs} epochs, {world} process(es): {wall:.1f} s wall; "
              + ", ".join(f"rank {r['rank']} {r['seconds']:.1f} s" + (f" / {r['peak_alloc_gib']:.1f} GiB"
                                                                    if r["peak_alloc_gib"] else "") for r in ranks))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
