"""Command-line interface: ``flatquant calibrate | eval | compare | demo | plot``. The only argparse user."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import plot as plot_cmd
from .api import from_transforms, quantize_model, resolve_device
from .calib.config import CalibConfig
from .calib.loop import CalibrationMismatch
from .data import DEFAULT_CORPUS, DataError, calibration_windows, eval_windows, tokenize_corpus
from .evaluate import perplexity
from .io import TransformFileError, load_transforms, save_transforms
from .models.hf import DEFAULT_MODEL, ModelLoadError, load
from .presets import BIT_PRESETS, METHODS, bits_config, bits_preset

log = logging.getLogger("flatquant")
USER_ERRORS = (ModelLoadError, DataError, TransformFileError, CalibrationMismatch, ValueError, FileNotFoundError)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF model folder, .gguf file, cached hub id, or {DEFAULT_MODEL!r} (the embedded "
                        "SmolLM2-135M-Instruct; default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration windows and initial transforms")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging (per-epoch losses)")


def _add_bits(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bit settings")
    g.add_argument("--preset", default="w4a4kv4", choices=sorted(BIT_PRESETS),
                   help="named bit setting (default: w4a4kv4); the --*-bits flags override it")
    for name in ("w", "a", "k", "v", "q"):
        g.add_argument(f"--{name}-bits", type=int, default=None, help=f"{name} bits (16 = not quantized)")
    g.add_argument("--w-asym", action="store_true", help="asymmetric weight quantization")
    g.add_argument("--a-asym", action="store_true", help="asymmetric per-token activation quantization")
    g.add_argument("--w-groupsize", type=int, default=None, help="per-group weight quantization (GPTQ/RTN)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-data", default=DEFAULT_CORPUS,
                   help=f"{DEFAULT_CORPUS} (default, held-out split), wikitext2, c4, or a .txt/.jsonl file")
    g.add_argument("--eval-seqlen", type=int, default=2048, help="window length (default 2048)")
    g.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")


def _add_calib(p: argparse.ArgumentParser, *, nsamples: int = 128, seqlen: int = 2048, epochs: int = 15) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--data", default=DEFAULT_CORPUS, help="calibration corpus (train split), same choices as --eval-data")
    g.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows (default {nsamples})")
    g.add_argument("--seqlen", type=int, default=seqlen, help=f"calibration window length (default {seqlen})")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs per layer (default {epochs})")
    g.add_argument("--batch-size", type=int, default=4, help="calibration batch size (default 4)")
    g.add_argument("--lr", type=float, default=5e-3, help="transform learning rate; clipping uses 10x (default 5e-3)")
    g.add_argument("--weight-quant", choices=("rtn", "gptq"), default="rtn", help="weight quantizer (default rtn)")
    g.add_argument("--amp", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="training-forward dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--shuffle", action="store_true", help="shuffle calibration batches each epoch")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flatquant`` command."""
    ap = argparse.ArgumentParser(prog="flatquant", description="FlatQuant 4-bit quantization of Llama/Qwen models")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("calibrate", help="calibrate a method and save its transforms",
                       description="Calibrate transforms layer by layer and save them (resumable).")
    _add_model(c)
    c.add_argument("--method", default="flatquant", choices=sorted(METHODS), help="method (default flatquant)")
    _add_bits(c)
    _add_calib(c)
    c.add_argument("--out", required=True, type=Path, help="output directory (layer checkpoints, transforms, results)")
    c.add_argument("--eval", action="store_true", help="evaluate perplexity after calibration")
    _add_eval(c)

    e = sub.add_parser("eval", help="perplexity of the FP model, a data-free method, or saved transforms",
                       description="Evaluate perplexity on non-overlapping windows.")
    _add_model(e)
    e.add_argument("--transforms", type=Path, default=None, help="folder written by `flatquant calibrate`")
    e.add_argument("--method", default="fp", choices=["fp", "rtn", "quarot"],
                   help="without --transforms: fp (default), rtn or quarot (data-free methods)")
    _add_bits(e)
    _add_eval(e)
    e.add_argument("--out", type=Path, default=None, help="write results.json here")

    m = sub.add_parser("compare", help="several methods × bit settings in one run, with a table",
                       description="Run methods side by side; results are saved after each row and reused on rerun.")
    _add_model(m)
    m.add_argument("--methods", default="fp,rtn,smoothquant,quarot,flatquant",
                   help="comma-separated: fp and any of " + ", ".join(METHODS))
    m.add_argument("--presets", default="w4a4kv4,w4a16", help="comma-separated bit presets")
    _add_calib(m)
    _add_eval(m)
    m.add_argument("--out", required=True, type=Path, help="output directory")

    d = sub.add_parser("demo", help="quick FP vs RTN vs FlatQuant W4A4KV4 on the embedded model (≈5-10 min on CPU)",
                       description="Quick end-to-end run with reduced calibration settings.")
    _add_model(d)
    _add_calib(d, nsamples=16, seqlen=512, epochs=2)
    _add_eval(d)
    d.set_defaults(eval_windows=6)
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    plot_cmd.add_parser(sub)
    return ap


def quant_config_from_args(a: argparse.Namespace):
    """Preset plus per-flag overrides."""
    base = bits_preset(a.preset)
    bits = {n: getattr(a, f"{n}_bits") or getattr(base, n).bits for n in ("w", "a", "k", "v", "q")}
    return bits_config(bits["w"], bits["a"], bits["k"], bits["v"], bits["q"], w_asym=a.w_asym, a_asym=a.a_asym,
                       w_group=a.w_groupsize)


def calib_config_from_args(a: argparse.Namespace) -> CalibConfig:
    """CalibConfig from the calibration flags."""
    return CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                       weight_quantizer=a.weight_quant, amp_dtype=a.amp, shuffle=a.shuffle, seed=a.seed)


def _table(rows: list[dict]) -> str:
    head = f"{'method':<12} {'bits':<10} {'PPL':>10} {'calib s':>9} {'eval s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<12} {r['bits']:<10} {r['ppl']:>10.3f} {r['calib_seconds']:>9.1f} "
                     f"{r['eval_seconds']:>8.1f}")
    return "\n".join(lines)


def _write_results(out: Path, rows: list[dict], extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**extra, "rows": rows}, indent=1, default=str))
    tmp.replace(out / "results.json")


def _run_matrix(a: argparse.Namespace, methods: list[str], presets: list[str]) -> list[dict]:
    device = resolve_device(a.device)
    weights, tok = load(a.model)
    bos = weights.args.bos_token_id
    windows = eval_windows(tokenize_corpus(a.eval_data, "test", tok, bos_token_id=bos), a.eval_seqlen,
                           a.eval_windows)
    ccfg = calib_config_from_args(a)
    calib = None
    out: Path = a.out
    prev = {}
    if (out / "results.json").is_file():
        prev = {(r["method"], r["bits"], r["key"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    rows = []
    meta = {"model": a.model, "eval_data": a.eval_data, "eval_windows": int(windows.shape[0]),
            "eval_seqlen": a.eval_seqlen, "device": str(device), "calib": ccfg.to_dict(),
            "command": " ".join(sys.argv), "torch": torch.__version__}
    log.info("evaluating on %d windows × %d tokens of %s", windows.shape[0], a.eval_seqlen, a.eval_data)
    for preset in presets:
        qcfg = bits_preset(preset)
        for method in methods:
            if method == "fp" and preset != presets[0]:
                continue
            bits = "fp" if method == "fp" else qcfg.tag
            key = json.dumps([asdict(qcfg), ccfg.to_dict(), windows.shape[0], a.eval_data], default=str)
            if (method, bits, key) in prev:
                rows.append(prev[(method, bits, key)])
                log.info("%s %s: reusing result from %s", method, bits, out / "results.json")
                continue
            if calib is None and method in ("smoothquant", "flatquant"):
                calib = calibration_windows(tokenize_corpus(a.data, "train", tok, bos_token_id=bos), ccfg.nsamples,
                                            ccfg.seqlen, seed=ccfg.seed)
            log.info("%s %s: quantizing", method, bits)
            qm = quantize_model(weights, method=method, qcfg=qcfg, ccfg=ccfg, calib_tokens=calib, device=device,
                                workdir=out / f"{method}-{preset}")
            if qm.flats:
                save_transforms(out / f"{method}-{preset}", qm.flats, args=weights.args, qcfg=qcfg, tcfg=qm.tcfg,
                                ccfg=ccfg, method=method)
            t0 = time.time()
            ppl = perplexity(qm.weights, windows, qm.qcfg, device=device, desc=f"PPL {method} {bits}")
            row = {"method": method, "bits": bits, "ppl": ppl, "calib_seconds": qm.calib_seconds,
                   "eval_seconds": time.time() - t0, "key": key}
            rows.append(row)
            log.info("%s %s: PPL %.3f", method, bits, ppl)
            _write_results(out, rows + [r for r in prev.values() if r not in rows], meta)
    _write_results(out, rows, meta)
    return rows


def cmd_calibrate(a: argparse.Namespace) -> int:
    """``flatquant calibrate``."""
    device = resolve_device(a.device)
    qcfg = quant_config_from_args(a)
    ccfg = calib_config_from_args(a)
    weights, tok = load(a.model)
    bos = weights.args.bos_token_id
    calib = calibration_windows(tokenize_corpus(a.data, "train", tok, bos_token_id=bos), ccfg.nsamples, ccfg.seqlen,
                                seed=ccfg.seed)
    qm = quantize_model(weights, method=a.method, qcfg=qcfg, ccfg=ccfg, calib_tokens=calib, device=device,
                        workdir=a.out)
    path = save_transforms(a.out, qm.flats, args=weights.args, qcfg=qcfg, tcfg=qm.tcfg, ccfg=ccfg, method=a.method,
                           extra={"source_model": a.model})
    log.info("saved transforms to %s (calibration %.1fs)", path, qm.calib_seconds)
    row = {"method": a.method, "bits": qcfg.tag, "ppl": float("nan"), "calib_seconds": qm.calib_seconds,
           "eval_seconds": 0.0, "key": ""}
    if a.eval:
        windows = eval_windows(tokenize_corpus(a.eval_data, "test", tok, bos_token_id=bos), a.eval_seqlen,
                               a.eval_windows)
        t0 = time.time()
        row["ppl"] = perplexity(qm.weights, windows, qcfg, device=device)
        row["eval_seconds"] = time.time() - t0
    _write_results(a.out, [row], {"command": " ".join(sys.argv), "calib": ccfg.to_dict()})
    print(_table([row]))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    """``flatquant eval``."""
    device = resolve_device(a.device)
    weights, tok = load(a.model)
    if a.transforms is not None:
        flats, qcfg, tcfg, meta = load_transforms(a.transforms, weights.args)
        qm = from_transforms(weights, flats, qcfg, tcfg, meta["method"])
    else:
        qcfg = quant_config_from_args(a)
        from .calib.config import CalibConfig as _C

        qm = quantize_model(weights, method=a.method, qcfg=qcfg, ccfg=_C(), calib_tokens=None, device=device)
    windows = eval_windows(tokenize_corpus(a.eval_data, "test", tok, bos_token_id=weights.args.bos_token_id),
                           a.eval_seqlen, a.eval_windows)
    t0 = time.time()
    ppl = perplexity(qm.weights, windows, qm.qcfg, device=device)
    row = {"method": qm.method, "bits": "fp" if qm.method == "fp" else qm.qcfg.tag, "ppl": ppl,
           "calib_seconds": 0.0, "eval_seconds": time.time() - t0, "key": ""}
    if a.out is not None:
        _write_results(a.out, [row], {"command": " ".join(sys.argv), "eval_windows": int(windows.shape[0])})
    print(_table([row]))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """``flatquant compare``: a table of methods × presets."""
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m != "fp" and m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from fp, {', '.join(METHODS)}")
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    for p in presets:
        bits_preset(p)
    rows = _run_matrix(a, methods, presets)
    print(_table(rows))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """``flatquant demo``: FP, RTN and FlatQuant at W4A4KV4 with quick settings."""
    t0 = time.time()
    rows = _run_matrix(a, ["fp", "rtn", "flatquant"], ["w4a4kv4"])
    print(f"\nSmolLM2-135M (weights dequantized from its Q4_1 GGUF = 'FP'), held-out {a.eval_data}, "
          f"first {a.eval_windows} windows × {a.eval_seqlen} tokens; FlatQuant quick settings: "
          f"{a.nsamples}×{a.seqlen} tokens, {a.epochs} epochs")
    print(_table(rows))
    print(f"total {time.time() - t0:.0f}s; results in {a.out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flatquant`` console script."""
    a = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handlers = {"calibrate": cmd_calibrate, "eval": cmd_eval, "compare": cmd_compare, "demo": cmd_demo,
                "plot": plot_cmd.run}
    try:
        return handlers[a.cmd](a)
    except USER_ERRORS as e:
        print(f"flatquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flatquant: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
