"""Calibration speed and memory of one decoder layer with random weights (paper settings by default).

    python bench/bench_calib.py --shape llama3-8b --epochs 15 --nsamples 128 --seqlen 2048 --layers 2

Calibrates ``--layers`` random layers one after the other with one shared (compiled) gradient step, as
``calibrate`` does; the first layer pays ``torch.compile``, the last is the per-layer figure of a model.
Prints a table and writes ``bench/results/calib_<shape>_<epochs>ep<tag>.json`` with the GPU, versions, command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.calib.config import CalibConfig  # noqa: E402
from flatquant.calib.loop import fp_layer_pass, make_grad_fn, resolve_amp, train_layer  # noqa: E402
from flatquant.calib.methods import method_config  # noqa: E402
from flatquant.models.args import ModelArgs  # noqa: E402
from flatquant.models.flat import init_flat_params  # noqa: E402
from flatquant.models.model import rope_for  # noqa: E402
from flatquant.models.random import LLAMA2_7B, LLAMA3_8B, random_weights  # noqa: E402
from flatquant.presets import bits_preset  # noqa: E402

SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "llama2-7b": LLAMA2_7B,
    "smollm2-135m": ModelArgs(vocab_size=49152, hidden=576, intermediate=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                              head_dim=64, rms_eps=1e-5, tie_embeddings=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2,
                    help="layers calibrated one after the other, as in a model (the first pays compilation)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--preset", default="w4a4kv4")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--cuda-graph", default="off", choices=("auto", "on", "off"))
    ap.add_argument("--recompute", default="auto", choices=("auto", "on", "off"),
                    help="CalibConfig.recompute (eager step only; auto: off)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args()
    dev = torch.device(a.device)
    shape = SHAPES[a.shape].__class__(**{**SHAPES[a.shape].to_dict(), "n_layers": a.layers, "vocab_size": 16})
    w = random_weights(shape, generator=torch.Generator().manual_seed(0), outlier_channels=8)
    ccfg = CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, epochs=a.epochs, batch_size=a.batch_size,
                       amp_dtype=a.amp, compile=a.compile, cuda_graph=a.cuda_graph, recompute=a.recompute)
    amp = resolve_amp(ccfg, dev)
    q, t = bits_preset(a.preset), method_config("flatquant")
    g = torch.Generator(device="cpu").manual_seed(1)
    buf = torch.float32 if amp == torch.float32 else amp
    inps = (torch.randn(a.nsamples, a.seqlen, shape.hidden, generator=g)).to(dev, buf)
    rope = rope_for(w.to(dev), a.seqlen, dev)
    step_fn = make_grad_fn(ccfg, dev)  # shared by the layers, as calibrate() does
    steps = ccfg.epochs * ccfg.steps_per_epoch
    layers = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.layers):
        frozen = {k: v.to(dev) for k, v in w.layers[i].items()}
        t0 = time.perf_counter()
        outs, stats = fp_layer_pass(frozen, inps, rope, shape, a.batch_size, want_stats=True)
        tr, fx = init_flat_params(frozen, shape, q, t, absmax=stats, generator=torch.Generator().manual_seed(i))
        tr = {k: v.to(dev) for k, v in tr.items()}
        fx = {k: v.to(dev) for k, v in fx.items()}
        t1 = time.perf_counter()
        captured: list[bool] = []
        epoch_end: list[float] = []
        _, losses = train_layer(tr, fx, frozen, inps, outs, rope, shape, q, t, ccfg, generator=g, amp=amp,
                                on_capture=captured.append, step_fn=step_fn,
                                on_epoch=lambda *_: epoch_end.append(time.perf_counter()))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        layers.append({
            "fp_pass_s": t1 - t0, "train_s": t2 - t1, "layer_s": t2 - t0, "step_ms": 1000 * (t2 - t1) / max(steps, 1),
            # steady state: the epochs after the first (which holds compilation, autotuning and graph capture)
            "steady_step_ms": (1000 * (epoch_end[-1] - epoch_end[0]) / ((len(epoch_end) - 1) * ccfg.steps_per_epoch)
                               if len(epoch_end) > 1 else None),
            "first_epoch_s": epoch_end[0] - t1 if epoch_end else None,
            "cuda_graph_captured": bool(captured and captured[0]),
            "loss_first_epoch": losses[0] if losses else None, "loss_last_epoch": losses[-1] if losses else None,
        })
        inps = outs
        del frozen, tr, fx
    res = {
        "shape": a.shape, "settings": ccfg.to_dict(), "amp": str(amp), "preset": a.preset,
        "command": " ".join(["python"] + sys.argv), "layers": layers,
        # the per-layer figure of a model calibration: the last layer (compilation happens once, in layer 0)
        **{k: layers[-1][k] for k in ("fp_pass_s", "train_s", "layer_s", "step_ms", "steady_step_ms")},
        "first_layer_s": layers[0]["layer_s"],
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if dev.type == "cuda" else None,
        "env": environment(),
    }
    print(f"{'shape':<14}{'layer':>6}{'epochs':>7}{'steps':>7}{'layer s':>9}{'step ms':>9}{'steady ms':>11}"
          f"{'graph':>7}")
    for i, r in enumerate(layers):
        print(f"{a.shape:<14}{i:>6}{a.epochs:>7}{steps:>7}{r['layer_s']:>9.1f}{r['step_ms']:>9.1f}"
              f"{(r['steady_step_ms'] or 0):>11.1f}{str(r['cuda_graph_captured']):>7}")
    print(f"peak allocated {(res['peak_alloc_gib'] or 0):.2f} GiB, reserved {(res['peak_reserved_gib'] or 0):.2f} GiB")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"calib_{a.shape}_{a.epochs}ep{a.tag}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
