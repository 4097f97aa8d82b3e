"""``flatquant generate``'s engine against transformers ``generate`` on the same real model, side by side.

Exports (or reuses) a real checkpoint of ``--model`` from ``--transforms``, then times greedy generation of
``--new`` tokens after a short prompt, after one warm-up call per engine (compilation and graph capture are
reported apart from the timed call):

* ``flatquant-real``: :func:`flatquant.export.load_checkpoint` + ``RealModel.generate`` (CUDA: compiled layers and a
  CUDA-graph decode; CPU: the reference ops);
* ``hf-fp32`` (CPU) / ``hf-bf16-static`` (CUDA): transformers ``generate`` of the unquantized model (on CUDA with
  ``cache_implementation="static"``, which compiles its decode step).

Usage: ``PYTHONPATH=. python bench/bench_generate.py --transforms bench/results/transforms_smollm2_w4a4kv4_15ep
--out bench/results/generate_cpu.json`` (add ``--device cuda`` on the GPU machine).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402

log = logging.getLogger("bench_generate")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(ckpt: Path, ids: torch.Tensor, new: int, device: torch.device) -> dict:
    """Warm-up and timed greedy generation on the real engine: seconds to the first token and tokens/s after it."""
    from flatquant.models.real.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    model = load_checkpoint(ckpt, device)
    load_s = time.perf_counter() - t0
    out: dict = {"load_s": load_s}
    for phase in ("warmup", "timed"):
        _sync(device)
        t0 = time.perf_counter()
        first = None
        n = 0
        for _ in model.generate(ids.to(device), new):
            if first is None:
                _sync(device)
                first = time.perf_counter()
            n += 1
        _sync(device)
        end = time.perf_counter()
        out[f"{phase}_first_token_s"] = first - t0
        out[f"{phase}_tok_s"] = (n - 1) / max(end - first, 1e-9)
        out[f"{phase}_total_s"] = end - t0
    return out


def time_hf(model_src: str, ids: torch.Tensor, new: int, device: torch.device) -> dict:
    """The same for transformers ``generate`` of the unquantized model (static cache on CUDA)."""
    from transformers import AutoModelForCausalLM

    from flatquant.models.hf import resolve_source

    folder, gguf = resolve_source(model_src)
    kw = {"gguf_file": gguf} if gguf else {}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()
    gen = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    if device.type == "cuda":
        gen["cache_implementation"] = "static"
    out: dict = {}
    for phase in ("warmup", "timed"):
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            model.generate(ids.to(device), **{**gen, "max_new_tokens": 1, "min_new_tokens": 1})
            _sync(device)
            t1 = time.perf_counter()
            model.generate(ids.to(device), **gen)
            _sync(device)
            t2 = time.perf_counter()
        prefill = t1 - t0
        out[f"{phase}_first_token_s"] = prefill
        out[f"{phase}_tok_s"] = (new - 1) / max((t2 - t1) - prefill, 1e-9)
    return out


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--transforms", type=Path, default=None, help="calibrated transforms to export (or --checkpoint)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="an exported checkpoint (skips the export)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new", type=int, default=64, help="tokens to generate (default 64)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if (a.transforms is None) == (a.checkpoint is None):
        ap.error("give exactly one of --transforms or --checkpoint")
    device = torch.device(a.device)
    from flatquant.models.hf import load

    weights, tok = load(a.model)
    ids = tok(a.prompt, return_tensors="pt").input_ids
    result: dict = {"env": environment(), "model": a.model, "prompt_tokens": int(ids.shape[1]), "new": a.new}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint
        if ckpt is None:
            from flatquant.io import load_transforms
            from flatquant.models.real.checkpoint import declared_dtype, export_checkpoint

            flats, qcfg, tcfg, meta = load_transforms(a.transforms, weights.args)
            ckpt = Path(tmp) / "ck"
            # the storage dtype `flatquant export` uses by default (--dtype auto): the model's declared 16-bit dtype
            export_checkpoint(weights, flats, qcfg, tcfg, ckpt, method=meta["method"], dtype=declared_dtype(weights))
        del weights
        result["ours"] = time_ours(ckpt, ids, a.new, device)
        log.info("ours: %s", result["ours"])
    result["hf"] = time_hf(a.model, ids, a.new, device)
    log.info("hf: %s", result["hf"])
    result["ratio_tok_s"] = result["ours"]["timed_tok_s"] / result["hf"]["timed_tok_s"]
    print(f"| engine | first token s (warm) | tokens/s (warm) |\n|---|---|---|\n"
          f"| flatquant-real | {result['ours']['timed_first_token_s']:.3f} | {result['ours']['timed_tok_s']:.1f} |\n"
          f"| transformers | {result['hf']['timed_first_token_s']:.3f} | {result['hf']['timed_tok_s']:.1f} |\n"
          f"ours / transformers tokens/s: {result['ratio_tok_s']:.2f}")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
