"""Checkpoint size of a LLaMA-3-8B-shaped W4A4KV4 export against the model's bf16 size, on CPU.

The whole model (16 GB in bf16) is not built: the script exports the same architecture with 1 and with 2 decoder
layers (random weights, identity-initialised FlatQuant transforms, bf16 storage), measures both folders, and
takes 32 layers as ``size(1) + 31 · (size(2) − size(1))`` (every decoder layer is stored alike). The same for the
int8 embedding / LM head option (``embed_bits=8``), whose top-level tensors differ only. Writes a table and JSON.

Usage: ``python bench/ckpt_size.py --out bench/results/ckpt_size_llama3-8b.json`` (a few minutes, ~8 GB RAM).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402

from flatquant.calib.methods import method_config  # noqa: E402
from flatquant.models.flat import init_flat_params  # noqa: E402
from flatquant.models.random import LLAMA3_8B, random_weights  # noqa: E402
from flatquant.models.real.checkpoint import export_checkpoint  # noqa: E402
from flatquant.presets import bits_preset  # noqa: E402

log = logging.getLogger("ckpt_size")


def folder_bytes(path: Path) -> int:
    """Bytes of every file below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_bytes(layers: int, embed_bits: int | None, tmp: Path) -> int:
    """Bytes of the W4A4KV4 export of the LLaMA-3-8B shape with ``layers`` decoder layers."""
    args = dataclasses.replace(LLAMA3_8B, n_layers=layers)
    gen = torch.Generator().manual_seed(0)
    weights = random_weights(args, generator=gen, dtype=torch.bfloat16)
    # the diag scales start at one (the smoothquant init needs activation statistics): sizes are the same
    qcfg, tcfg = bits_preset("w4a4kv4"), dataclasses.replace(method_config("flatquant"), diag_init="ones")
    flats = []
    for i in range(layers):
        trainable, fixed = init_flat_params(weights.layers[i], args, qcfg, tcfg, absmax=None,
                                            generator=torch.Generator().manual_seed(i))
        flats.append({**trainable, **fixed})
    out = tmp / f"ck{layers}_{embed_bits}"
    export_checkpoint(weights, flats, qcfg, tcfg, out, dtype=torch.bfloat16, embed_bits=embed_bits)
    size = folder_bytes(out)
    log.info("%d layer(s), embed_bits=%s: %d bytes", layers, embed_bits, size)
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ckpt_size_llama3-8b.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = LLAMA3_8B
    per_layer_params = sum(o * i for o, i in args.linear_shapes.values()) + 2 * args.hidden
    params = 2 * args.vocab_size * args.hidden + args.hidden + args.n_layers * per_layer_params
    bf16_bytes = 2 * params
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one, two = export_bytes(1, None, Path(tmp)), export_bytes(2, None, Path(tmp))
        one8 = export_bytes(1, 8, Path(tmp))
    layer = two - one
    for name, first in (("bf16 embedding / LM head (default)", one), ("--embed-bits 8", one8)):
        total = first + (args.n_layers - 1) * layer
        rows.append({"setting": name, "bytes_1_layer": first, "bytes_per_layer": layer, "bytes_32_layers": total,
                     "x_bf16": total / bf16_bytes})
    print(f"LLaMA-3-8B shape: {params:,} parameters, {bf16_bytes / 1e9:.2f} GB in bf16")
    print("| setting | 32-layer checkpoint GB | × bf16 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['bytes_32_layers'] / 1e9:.3f} | {r['x_bf16']:.3f} |")
    write_json(a.out, {"command": " ".join(sys.argv), "env": environment(), "params": params,
                       "bf16_bytes": bf16_bytes, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
