"""One LLaMA-3-70B-shaped layer at paper settings (``bench_calib.py`` with a ``llama3-70b`` shape), and the
computed totals of a whole 80-layer calibration on 1 and on 8 GPUs.

    python bench/bench_calib_70b.py --layers 1 --epochs 4 --tag _h200

runs ``bench_calib.py --shape llama3-70b`` with the other flags (hidden 8192, intermediate 28672,
64 heads, 8 KV heads; 128 × 2048 tokens, batch 4, bf16 autocast, compiled step by default), then adds to
its JSON (``bench/results/calib_llama3-70b_<epochs>ep<tag>.json``):

* the 15-epoch per-layer time extrapolated from the steady-state step time
  (``fp_pass_s + 15 · steps_per_epoch · steady_step_ms``). Fewer epochs keep the run inside a few minutes
  of device time; the peak memory of a step does not depend on the number of epochs.
* the totals for 80 layers on one GPU, and on 8 GPUs layer-parallel: 10 layers each, plus the last rank's
  FP forwards through the 70 layers before its block (about one ``fp_pass_s`` each), plus one
  compilation per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_calib  # noqa: E402
from bench_layer_parallel import LLAMA3_70B  # noqa: E402

PAPER_EPOCHS, N_LAYERS = 15, 80


def totals(res: dict) -> dict:
    """Extrapolated 15-epoch layer time and 80-layer totals (seconds) on 1 and 8 GPUs."""
    steady = res["steady_step_ms"] or res["step_ms"]
    steps_per_epoch = res["settings"]["nsamples"] // res["settings"]["batch_size"]
    layer = res["fp_pass_s"] + PAPER_EPOCHS * steps_per_epoch * steady / 1000
    compile_s = max(res["first_layer_s"] - res["layer_s"], 0.0) if len(res["layers"]) > 1 else \
        max(res["layers"][0]["first_epoch_s"] - steps_per_epoch * steady / 1000, 0.0)
    per_rank = N_LAYERS // 8
    return {"layer_s_15ep_extrapolated": layer, "compile_s": compile_s,
            "total_1gpu_s": compile_s + N_LAYERS * layer,
            "total_8gpu_s": compile_s + (N_LAYERS - per_rank) * res["fp_pass_s"] + per_rank * layer}


def main() -> int:
    bench_calib.SHAPES["llama3-70b"] = LLAMA3_70B
    if "--shape" not in sys.argv:
        sys.argv[1:1] = ["--shape", "llama3-70b"]
    rc = bench_calib.main()
    argv = sys.argv[1:]
    epochs = argv[argv.index("--epochs") + 1] if "--epochs" in argv else "15"
    tag = argv[argv.index("--tag") + 1] if "--tag" in argv else ""
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path(__file__).resolve().parent / "results"
    path = out / f"calib_{argv[argv.index('--shape') + 1]}_{epochs}ep{tag}.json"
    res = json.loads(path.read_text())
    res["totals_80_layers"] = totals(res)
    path.write_text(json.dumps(res, indent=1))
    t = res["totals_80_layers"]
    print(f"15-epoch layer (extrapolated) {t['layer_s_15ep_extrapolated']:.1f} s, compile {t['compile_s']:.0f} s; "
          f"80 layers: 1 GPU {t['total_1gpu_s'] / 3600:.2f} h, 8 GPUs {t['total_8gpu_s'] / 3600:.2f} h")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
