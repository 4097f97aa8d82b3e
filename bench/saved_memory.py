"""Autograd memory of one calibration step, measured on any device: the bytes saved for backward.

Runs the training forward of one random-weight decoder layer (the same ``layer_loss`` the calibration loop
differentiates) under ``torch.autograd.graph.saved_tensors_hooks`` and sums the distinct storages kept for backward,
at two token counts. The difference gives the per-token cost; the rest is the weight side (the refolded,
fake-quantized weights), so the step memory at the paper's 4 × 2048 tokens follows by extrapolation:

    python bench/saved_memory.py --shape llama3-8b --tokens 256,512 --out bench/results/saved_memory_llama3-8b.json

Both modes of the weight fold run side by side: ``plain`` keeps every intermediate, ``recompute``
(``CalibConfig.recompute="on"``, eager step; off by default since the compiled step measured better on the H100)
refolds each weight in backward.

This counts what the autograd graph holds, not allocator overhead or transient peaks inside one op.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_calib import SHAPES  # noqa: E402
from env import environment  # noqa: E402

from flatquant.calib.loop import fp_layer_pass, layer_loss  # noqa: E402
from flatquant.calib.methods import method_config  # noqa: E402
from flatquant.models.flat import init_flat_params  # noqa: E402
from flatquant.models.model import rope_for  # noqa: E402
from flatquant.models.random import random_weights  # noqa: E402
from flatquant.presets import bits_preset  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages that autograd saves while ``fn()`` runs (the graph is then dropped)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="128,256", help="two sequence lengths (batch 1)")
    ap.add_argument("--amp", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--preset", default="w4a4kv4")
    ap.add_argument("--target-tokens", type=int, default=4 * 2048, help="tokens per step to extrapolate to")
    ap.add_argument("--out", default=None, help="JSON output path")
    a = ap.parse_args()
    args = SHAPES[a.shape].__class__(**{**SHAPES[a.shape].to_dict(), "n_layers": 1, "vocab_size": 16})
    w = random_weights(args, generator=torch.Generator().manual_seed(0), outlier_channels=8)
    q, t = bits_preset(a.preset), method_config("flatquant")
    frozen = w.layers[0]
    amp = getattr(torch, a.amp)
    t1, t2 = (int(v) for v in a.tokens.split(","))
    out = {"shape": a.shape, "amp": a.amp, "preset": a.preset, "target_tokens": a.target_tokens,
           "weight_params_gib_fp32": sum(v.numel() for k, v in frozen.items() if k.endswith(".weight")) * 4 / 2**30,
           "env": environment(), "modes": {}}
    for recompute in (False, True):
        res = {}
        for n in (t1, t2):
            x = torch.randn(1, n, args.hidden, generator=torch.Generator().manual_seed(n))
            rope = rope_for(w, n, torch.device("cpu"))
            y, stats = fp_layer_pass(frozen, x, rope, args, 1, want_stats=True)
            tr, fx = init_flat_params(frozen, args, q, t, absmax=stats, generator=torch.Generator().manual_seed(0))
            leaves = {k: v.requires_grad_() for k, v in tr.items()}
            res[n] = saved_bytes(lambda: layer_loss(leaves, fx, frozen, x, y, rope, args, q, t.kind, amp,
                                                    recompute=recompute)[0])
        per_token = (res[t2] - res[t1]) / (t2 - t1)
        weight_side = res[t1] - per_token * t1
        mode = {"saved_bytes": res, "per_token_bytes": per_token, "weight_side_gib": weight_side / 2**30,
                "step_saved_gib_at_target": (weight_side + per_token * a.target_tokens) / 2**30}
        out["modes"]["recompute" if recompute else "plain"] = mode
        print(f"{a.shape} {a.preset} amp={a.amp} {'recompute' if recompute else 'plain':>9}: weight side "
              f"{mode['weight_side_gib']:.2f} GiB (fp32 weights {out['weight_params_gib_fp32']:.2f} GiB), "
              f"{per_token / 1e6:.3f} MB/token, {mode['step_saved_gib_at_target']:.2f} GiB saved at "
              f"{a.target_tokens} tokens")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
