"""Command-line interface: ``flatquant calibrate | eval | compare | demo | plot | export | generate | lm-eval``.
The only argparse user."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import sys
import time
import typing
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .api import GenerationConfig, fp_model, from_transforms, quantize_model, resolve_device
from .calib.config import CalibConfig
from .calib.loop import CalibrationMismatch
from .calib.methods import DEFAULT_METHOD, METHODS, UNQUANTIZED, get_method, method_names
from .data import (
    DEFAULT_CORPUS,
    DataError,
    calibration_windows,
    check_source,
    eval_windows,
    same_local_file,
    tokenize_corpus,
)
from .evaluation import plots
from .evaluation.lmeval import LMEvalUnavailable
from .evaluation.perplexity import EvalConfig, perplexity, perplexity_from_nlls, real_window_nlls
from .io import TransformFileError, load_transforms, save_transforms
from .models.hf import DEFAULT_MODEL, ModelLoadError, load
from .presets import BIT_PRESETS, bits_config, bits_preset

log = logging.getLogger("flatquant")
USER_ERRORS = (ModelLoadError, DataError, TransformFileError, CalibrationMismatch, LMEvalUnavailable, ValueError,
               FileNotFoundError)
"""Errors reported in one line with exit 2 (``models.real.checkpoint.CheckpointError`` is a ``ValueError``; the
checkpoint module, and with it the engine and Triton, is imported only by the commands that need it, so ``--help``
stays light)."""


def _add_model(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_MODEL) -> None:
    tail = "default" if default else "default: the model recorded with --transforms, else that one"
    p.add_argument("--model", default=default,
                   help=f"HF model folder, .gguf file, cached hub id, or {DEFAULT_MODEL!r} (the embedded "
                        f"SmolLM2-135M-Instruct; {tail})")
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


def _config_field(cls: type, name: str) -> tuple[object, tuple[str, ...] | None]:
    """The default of a config dataclass field and, for a ``Literal`` field, its choices (the CLI takes both from the
    config, so the two cannot drift apart)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    return field.default, (typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None)


def _add_calib(p: argparse.ArgumentParser, *, nsamples: int | None = None, seqlen: int | None = None,
               epochs: int | None = None) -> None:
    """The calibration flags; defaults and choices come from :class:`CalibConfig` (``nsamples``/``seqlen``/``epochs``
    override the defaults, e.g. for the quick demo)."""
    g = p.add_argument_group("calibration")

    def add(flag: str, name: str, help_: str, override: object = None, **kw: object) -> None:
        default, choices = _config_field(CalibConfig, name)
        default = default if override is None else override
        if choices is not None:
            kw["choices"] = choices
        g.add_argument(flag, default=default, help=f"{help_} (default {default})", **kw)

    g.add_argument("--data", default=DEFAULT_CORPUS,
                   help="calibration corpus (train split); same choices as --eval-data")
    add("--nsamples", "nsamples", "calibration windows", nsamples, type=int)
    add("--seqlen", "seqlen", "calibration window length", seqlen, type=int)
    add("--epochs", "epochs", "epochs per layer", epochs, type=int)
    add("--batch-size", "batch_size", "calibration batch size", type=int)
    add("--lr", "lr", "transform learning rate; clipping uses 10x", type=float)
    add("--weight-quant", "weight_quantizer", "weight quantizer")
    add("--amp", "amp_dtype", "training-forward dtype (auto: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--shuffle", action="store_true", help="shuffle calibration batches each epoch")
    add("--compile", "compile", "torch.compile the calibration step (auto: on CUDA; 3x faster, 2.7x less memory)")
    add("--recompute", "recompute", "eager step only: recompute quantizer intermediates in backward (auto: off)")
    add("--cuda-graph", "cuda_graph", "replay the calibration step as a CUDA graph (auto: on CUDA, checked against "
                                      "eager first)")
    g.add_argument("--nondeterministic", dest="deterministic", action="store_false",
                   help="train with PyTorch's default (possibly faster) CUDA kernels instead of deterministic ones: "
                        "two runs, and layer-parallel against one process, then give different transforms")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flatquant`` command."""
    ap = argparse.ArgumentParser(prog="flatquant", description="FlatQuant 4-bit quantization of Llama/Qwen models")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("calibrate", help="calibrate a method and save its transforms",
                       description="Calibrate transforms layer by layer and save them (resumable).")
    _add_model(c)
    c.add_argument("--method", default=DEFAULT_METHOD, choices=method_names(quantize=True),
                   help=f"method (default {DEFAULT_METHOD}): " + "; ".join(f"{n}: {METHODS[n].summary}"
                                                                    for n in method_names(quantize=True)))
    _add_bits(c)
    _add_calib(c)
    c.add_argument("--out", required=True, type=Path, help="output directory (layer checkpoints, transforms, results)")
    c.add_argument("--eval", action="store_true", help="evaluate perplexity after calibration")
    _add_eval(c)

    e = sub.add_parser("eval", help="perplexity of the FP model, a data-free method, or saved transforms",
                       description="Evaluate perplexity on non-overlapping windows.")
    _add_model(e, default=None)
    e.add_argument("--transforms", type=Path, default=None, help="folder written by `flatquant calibrate`")
    e.add_argument("--method", default=UNQUANTIZED, choices=method_names(data_free=True),
                   help=f"without --transforms: a data-free method, {', '.join(method_names(data_free=True))} "
                        f"(default {UNQUANTIZED})")
    _add_bits(e)
    _add_eval(e)
    e.add_argument("--out", type=Path, default=None, help="write results.json here")
    e.add_argument("--real", action="store_true", help="evaluate a real quantized checkpoint (needs --checkpoint)")
    e.add_argument("--checkpoint", type=Path, default=None, help="folder written by `flatquant export`")

    m = sub.add_parser("compare", help="several methods × bit settings in one run, with a table",
                       description="Run methods side by side; results are saved after each row and reused on rerun.")
    _add_model(m)
    m.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, any of {', '.join(METHODS)} (default: all)")
    m.add_argument("--presets", default="w4a4kv4,w4a16", help="comma-separated bit presets")
    m.add_argument("--weight-quants", default=None,
                   help="comma-separated weight quantizers, e.g. rtn,gptq: a row per quantizer, sharing each "
                        "method's calibration (default: --weight-quant)")
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
    _add_plot_parser(sub)
    _add_real_parsers(sub)
    return ap


def _add_plot_parser(sub: argparse._SubParsersAction) -> None:
    """``plot`` (:func:`cmd_plot`)."""
    p = sub.add_parser(
        "plot", help="flatness figures (paper Fig. 1 and 2) as PNG files",
        description="Sorted per-channel magnitudes of weights and activations (Fig. 1) and quantization error "
                    "across layers and tokens (Fig. 2) for original/RTN, SmoothQuant-style, QuaRot-style and "
                    "FlatQuant (from a transform folder).")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF model folder, .gguf file, cached hub id, or {DEFAULT_MODEL!r} (default)")
    p.add_argument("--transforms", type=Path, default=None,
                   help="folder written by `flatquant calibrate --method flatquant` (adds the FlatQuant curves "
                        "and sets the bit setting); without it only the baselines are drawn")
    p.add_argument("--preset", default="w4a4kv4", choices=sorted(BIT_PRESETS),
                   help="bit setting when --transforms is not given (default w4a4kv4)")
    p.add_argument("--layers", default="",
                   help="comma-separated layer indices for Fig. 1, negative from the end (default: first, middle, "
                        "last)")
    p.add_argument("--sites", default="qkv,down",
                   help=f"comma-separated activation sites for Fig. 1: {', '.join(plots.SITES)} (default qkv,down)")
    p.add_argument("--reduce", choices=("max", "l2"), default="max",
                   help="per-channel magnitude: max |.| (default) or L2 norm (the paper's measure)")
    p.add_argument("--data", default=DEFAULT_CORPUS,
                   help="corpus: SmoothQuant statistics from its train split, plotted activations from its test "
                        "split (same choices as `calibrate --data`)")
    p.add_argument("--nsamples", type=int, default=8, help="windows to measure and to take statistics on (default 8)")
    p.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and random transforms")
    p.add_argument("--out", type=Path, required=True, help="output folder for flatness.png and mse.png")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging (per-layer ratios and errors)")


def quant_config_from_args(a: argparse.Namespace):
    """Preset plus per-flag overrides."""
    base = bits_preset(a.preset)
    given = {n: getattr(a, f"{n}_bits") for n in ("w", "a", "k", "v", "q")}
    for n, b in given.items():
        if b is not None and not (2 <= b <= 8 or b == 16):
            raise ValueError(f"--{n}-bits {b}: widths are 2-8, or 16 for 'not quantized'")
    if a.w_groupsize is not None and a.w_groupsize < 1:
        raise ValueError(f"--w-groupsize {a.w_groupsize}: a group size must be >= 1 (omit it for per-channel)")
    bits = {n: getattr(base, n).bits if b is None else b for n, b in given.items()}
    return bits_config(bits["w"], bits["a"], bits["k"], bits["v"], bits["q"], w_asym=a.w_asym, a_asym=a.a_asym,
                       w_group=a.w_groupsize)


def calib_config_from_args(a: argparse.Namespace) -> CalibConfig:
    """CalibConfig from the calibration flags (its validation names the flag)."""
    try:
        return CalibConfig(nsamples=a.nsamples, seqlen=a.seqlen, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                           weight_quantizer=a.weight_quant, amp_dtype=a.amp, shuffle=a.shuffle, seed=a.seed,
                           compile=a.compile, cuda_graph=a.cuda_graph, recompute=a.recompute,
                           deterministic=a.deterministic)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        flag = {"nsamples": "--nsamples", "seqlen": "--seqlen", "epochs": "--epochs", "batch_size": "--batch-size",
                "lr": "--lr"}.get(field)
        raise ValueError(f"{flag}: {e}" if flag else str(e)) from None


def eval_config_from_args(a: argparse.Namespace) -> EvalConfig:
    """EvalConfig from the --eval-* flags (validated: window length >= 2, windows >= 1)."""
    for flag, kw in (("--eval-seqlen", {"seqlen": a.eval_seqlen}), ("--eval-windows", {"windows": a.eval_windows})):
        try:
            EvalConfig(**kw)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    return EvalConfig(data=a.eval_data, seqlen=a.eval_seqlen, windows=a.eval_windows)


def _check_inputs(a: argparse.Namespace, *, calib: bool = False, evaluate: bool = False) -> None:
    """Every option and input file the command will use, checked before a model is loaded or a layer trained."""
    if calib:
        check_source(a.data, "--data")
    if evaluate:
        eval_config_from_args(a)
        check_source(a.eval_data, "--eval-data")
    if calib and evaluate and same_local_file(a.data, a.eval_data):
        log.warning("--data and --eval-data are the same file (%s): calibration and evaluation see the same text, "
                    "so the perplexity is optimistic; pass a held-out file to --eval-data", a.data)


def _test_windows(a: argparse.Namespace, tok, bos: int | None):
    """Held-out evaluation windows selected by the --eval-* flags."""
    ecfg = eval_config_from_args(a)
    return eval_windows(tokenize_corpus(ecfg.data, "test", tok, bos_token_id=bos), ecfg.seqlen, ecfg.windows)


def _calib_windows(a: argparse.Namespace, tok, bos: int | None, ccfg: CalibConfig):
    """Calibration windows from the train split of --data."""
    return calibration_windows(tokenize_corpus(a.data, "train", tok, bos_token_id=bos), ccfg.nsamples, ccfg.seqlen,
                               seed=ccfg.seed)


def _table(rows: list[dict]) -> str:
    head = f"{'method':<12} {'bits':<10} {'weights':<8} {'PPL':>10} {'calib s':>9} {'eval s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<12} {r['bits']:<10} {r.get('weights', '-'):<8} {r['ppl']:>10.3f} "
                     f"{r['calib_seconds']:>9.1f} {r['eval_seconds']:>8.1f}")
    return "\n".join(lines)


def _write_results(out: Path, rows: list[dict], extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({**extra, "rows": rows}, indent=1, default=str))
    tmp.replace(out / "results.json")


def _weight_quants(a: argparse.Namespace) -> list[str]:
    """The weight quantizers of a compare run (``--weight-quants``, else ``--weight-quant``), validated."""
    wqs = [w.strip() for w in (getattr(a, "weight_quants", None) or a.weight_quant).split(",") if w.strip()]
    for wq in wqs:
        if wq not in ("rtn", "gptq"):
            raise ValueError(f"unknown weight quantizer {wq!r} in --weight-quants; choose rtn and/or gptq")
    return wqs


def _run_matrix(a: argparse.Namespace, methods: list[str], presets: list[str]) -> list[dict]:
    wqs = _weight_quants(a)  # bad input fails before the model loads
    _check_inputs(a, calib=any(METHODS[m].needs_data for m in methods) or "gptq" in wqs, evaluate=True)
    device = resolve_device(a.device)
    weights, tok = load(a.model)
    bos = weights.args.bos_token_id
    windows = _test_windows(a, tok, bos)
    ccfg = calib_config_from_args(a)
    calib = None
    out: Path = a.out
    prev = {}
    if (out / "results.json").is_file():
        prev = {(r["method"], r["bits"], r["key"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    rows = []
    meta = {"model": a.model, "eval_data": a.eval_data, "eval_windows": int(windows.shape[0]),
            "eval_seqlen": a.eval_seqlen, "device": str(device), "calib": ccfg.to_dict(), "weight_quants": wqs,
            "command": " ".join(sys.argv), "torch": torch.__version__}
    log.info("evaluating on %d windows × %d tokens of %s", windows.shape[0], a.eval_seqlen, a.eval_data)
    for preset, wq, method in itertools.product(presets, wqs, methods):
        qcfg = bits_preset(preset)
        quantized = METHODS[method].quantize
        if not quantized:
            if (preset, wq) != (presets[0], wqs[0]):
                continue
            wq = "rtn"  # nothing is quantized: no GPTQ data needed
        elif wq == "gptq" and not qcfg.w.enabled and wqs != ["gptq"]:
            continue  # weights stay in full precision: the GPTQ row would repeat the RTN row
        ccfg = replace(ccfg, weight_quantizer=wq)
        bits = qcfg.tag if quantized else "fp"
        weights_col = wq if quantized and qcfg.w.enabled else "-"
        key = json.dumps([asdict(qcfg), ccfg.to_dict(), windows.shape[0], a.eval_data], default=str)
        if (method, bits, key) in prev:
            rows.append(prev[(method, bits, key)])
            log.info("%s %s: reusing result from %s", method, bits, out / "results.json")
            continue
        if calib is None and (METHODS[method].needs_data or (wq == "gptq" and qcfg.w.enabled)):
            calib = _calib_windows(a, tok, bos, ccfg)
        log.info("%s %s: quantizing", method, bits)
        qm = quantize_model(weights, method=method, qcfg=qcfg, ccfg=ccfg, calib_tokens=calib, device=device,
                            workdir=out / f"{method}-{preset}")
        if qm.flats:
            save_transforms(out / f"{method}-{preset}", qm.flats, args=weights.args, qcfg=qcfg, tcfg=qm.tcfg,
                            ccfg=ccfg, method=method, extra={"source_model": _model_record(a.model)})
        t0 = time.time()
        ppl = perplexity(qm.weights, windows, qm.qcfg, device=device, desc=f"PPL {method} {bits}")
        row = {"method": method, "bits": bits, "weights": weights_col, "ppl": ppl,
               "calib_seconds": qm.calib_seconds,
               "eval_seconds": time.time() - t0, "key": key}
        rows.append(row)
        log.info("%s %s: PPL %.3f", method, bits, ppl)
        _write_results(out, rows + [r for r in prev.values() if r not in rows], meta)
    _write_results(out, rows, meta)
    return rows


def cmd_calibrate(a: argparse.Namespace) -> int:
    """``flatquant calibrate``; under ``torchrun`` the layers are split between the processes."""
    from .calib.distributed import calibrate_parallel, collective_lock, init_distributed

    qcfg = quant_config_from_args(a)
    ccfg = calib_config_from_args(a)
    _check_inputs(a, calib=True, evaluate=a.eval)
    rank, world, device = init_distributed(resolve_device(a.device))
    try:
        with collective_lock(a.out, device):
            weights, tok = load(a.model)
            bos = weights.args.bos_token_id
            calib = _calib_windows(a, tok, bos, ccfg)
            windows = _test_windows(a, tok, bos) if a.eval else None  # read now: a bad file fails before training
            method = get_method(a.method)
            tcfg = method.layer
            t0 = time.time()
            flats, prov = calibrate_parallel(weights, calib if method.needs_data else None, qcfg, tcfg, ccfg,
                                             device=device, workdir=a.out)
            calib_seconds = time.time() - t0
            if rank != 0:
                return 0
            path = save_transforms(a.out, flats, args=weights.args, qcfg=qcfg, tcfg=tcfg, ccfg=ccfg, method=a.method,
                                   extra={"source_model": _model_record(a.model), "calibration": prov})
            log.info("saved transforms to %s (calibration %.1fs, %d process%s)", path, calib_seconds, world,
                     "es" if world > 1 else "")
            row = {"method": a.method, "bits": qcfg.tag, "ppl": float("nan"), "calib_seconds": calib_seconds,
                   "eval_seconds": 0.0, "key": ""}
            if a.eval:  # folds (and GPTQ) from the checkpoints just written: no layer is trained again
                qm = quantize_model(weights, method=a.method, qcfg=qcfg, ccfg=ccfg, calib_tokens=calib,
                                    device=device, workdir=a.out)
                t0 = time.time()
                row["ppl"] = perplexity(qm.weights, windows, qcfg, device=device)
                row["eval_seconds"] = time.time() - t0
            _write_results(a.out, [row], {"command": " ".join(sys.argv), "calib": ccfg.to_dict(),
                                          "world_size": world})
            print(_table([row]))
            return 0
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def cmd_eval(a: argparse.Namespace) -> int:
    """``flatquant eval``."""
    if a.real or a.checkpoint is not None:
        return cmd_eval_real(a)
    _check_inputs(a, evaluate=True)
    qcfg = quant_config_from_args(a) if a.transforms is None else None
    device = resolve_device(a.device)
    if a.transforms is not None:
        weights, tok = _load_for_transforms(a.transforms, a.model)
        flats, qcfg, tcfg, meta = load_transforms(a.transforms, weights.args)
        qm = from_transforms(weights, flats, qcfg, tcfg, meta["method"])
    else:
        weights, tok = load(a.model or DEFAULT_MODEL)
        qm = quantize_model(weights, method=a.method, qcfg=qcfg, ccfg=CalibConfig(), calib_tokens=None, device=device)
    windows = _test_windows(a, tok, weights.args.bos_token_id)
    t0 = time.time()
    ppl = perplexity(qm.weights, windows, qm.qcfg, device=device)
    row = {"method": qm.method, "bits": "fp" if qm.method == UNQUANTIZED else qm.qcfg.tag, "ppl": ppl,
           "calib_seconds": 0.0, "eval_seconds": time.time() - t0, "key": ""}
    if a.out is not None:
        _write_results(a.out, [row], {"command": " ".join(sys.argv), "eval_windows": int(windows.shape[0])})
    print(_table([row]))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """``flatquant compare``: a table of methods × presets."""
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    for p in presets:
        bits_preset(p)
    rows = _run_matrix(a, methods, presets)
    print(_table(rows))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """``flatquant demo``: FP, RTN and FlatQuant at W4A4KV4 with quick settings."""
    t0 = time.time()
    rows = _run_matrix(a, [UNQUANTIZED, "rtn", DEFAULT_METHOD], ["w4a4kv4"])
    print(f"\nSmolLM2-135M (weights dequantized from its Q4_1 GGUF = 'FP'), held-out {a.eval_data}, "
          f"first {a.eval_windows} windows × {a.eval_seqlen} tokens; FlatQuant quick settings: "
          f"{a.nsamples}×{a.seqlen} tokens, {a.epochs} epochs")
    print(_table(rows))
    print(f"total {time.time() - t0:.0f}s; results in {a.out / 'results.json'}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    """``flatquant plot``: load the model and transforms, build the baselines, write the two PNGs."""
    device = resolve_device(a.device)
    weights, tok = load(a.model)
    bos = weights.args.bos_token_id
    fq = None
    meta: dict = {}
    if a.transforms is not None:
        flats_fq, qcfg, tcfg_fq, meta = load_transforms(a.transforms, weights.args)
        fq = (flats_fq, tcfg_fq)
        log.info("FlatQuant transforms from %s (%s, method %s)", a.transforms, qcfg.tag, meta.get("method"))
    else:
        qcfg = bits_preset(a.preset)
    layers = plots.parse_layers(a.layers, weights.args.n_layers)
    sites = [s.strip() for s in a.sites.split(",") if s.strip()]
    calib = calibration_windows(tokenize_corpus(a.data, "train", tok, bos_token_id=bos), a.nsamples, a.seqlen,
                                seed=a.seed)
    test = eval_windows(tokenize_corpus(a.data, "test", tok, bos_token_id=bos), a.seqlen, a.nsamples)
    plots.write_figures(weights, calib, test, qcfg, a.out, layers=layers, flatquant=fq,
                        flatquant_calib=meta.get("calib"), sites=sites, reduce=a.reduce, seed=a.seed, device=device,
                        name=Path(str(a.model)).name)
    return 0


def _add_real_parsers(sub: argparse._SubParsersAction) -> None:
    """``export``, ``generate`` and ``lm-eval``."""
    x = sub.add_parser("export", help="write a real quantized checkpoint (packed int4 + transforms) from transforms",
                       description="Fold saved transforms into the model (float64, RTN weights as in the fake "
                                   "model) and write a sharded, checksummed safetensors checkpoint.")
    x.add_argument("--transforms", required=True, type=Path, help="folder written by `flatquant calibrate`")
    x.add_argument("--model", default=None,
                   help="the model the transforms were calibrated on (default: the one recorded in transforms.json, "
                        f"else {DEFAULT_MODEL!r})")
    x.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    x.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the embedding/LM head (norms and biases are always fp32; auto: the model's "
                        "declared dtype, else bfloat16)")
    x.add_argument("--embed-bits", type=int, choices=(8, 16), default=16,
                   help="16: embedding/LM head in --dtype (default); 8: per-row int8 + scale, dequantized at load")
    x.add_argument("--shard-gb", type=float, default=4.0, help="maximum shard size in GB (default 4)")
    x.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    g = sub.add_parser("generate", help="stream text from a real checkpoint (or the unquantized model)",
                       description="Greedy (temperature 0) or nucleus sampling from a real quantized checkpoint, "
                                   "or from the unquantized model with --model and no --checkpoint.")
    g.add_argument("--checkpoint", type=Path, default=None, help="folder written by `flatquant export`")
    g.add_argument("--model", default=None,
                   help="without --checkpoint: generate with this unquantized model (HF folder, .gguf file, cached "
                        f"hub id or {DEFAULT_MODEL!r}); with --checkpoint: its tokenizer is used when the checkpoint "
                        "has none")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")

    lm = sub.add_parser("lm-eval", help="lm-eval tasks on a real checkpoint or on saved transforms (fake path)",
                        description="Zero-shot tasks through lm-eval's HF wrapper; `flatquant_cloze` is an offline "
                                    "LAMBADA-style task built from the held-out corpus.")
    src = lm.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="real checkpoint folder (real path)")
    src.add_argument("--transforms", type=Path, help="transforms folder (fake path; needs the model)")
    lm.add_argument("--model", default=None,
                    help="model for --transforms (default: recorded in transforms.json); with --checkpoint: its "
                         "tokenizer is used when the checkpoint has none")
    lm.add_argument("--tasks", default="flatquant_cloze",
                    help="comma-separated lm-eval task names (default flatquant_cloze)")
    lm.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    lm.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    lm.add_argument("--cloze-data", default=DEFAULT_CORPUS,
                    help=f"corpus of the cloze task (test split; default {DEFAULT_CORPUS}, or a .jsonl file)")
    lm.add_argument("--cloze-docs", type=int, default=500, help="maximum cloze examples (default 500)")
    lm.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    lm.add_argument("--out", type=Path, default=None, help="write lm_eval.json here")
    lm.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _model_record(model: str) -> str:
    """How a model is recorded with its transforms: an absolute path for a local one, else as given."""
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def _source_model(transforms: Path, given: str | None) -> str:
    """``--model`` when given, else the model recorded with the transforms, else the default model."""
    if given:
        return given
    folder = Path(transforms) if Path(transforms).is_dir() else Path(transforms).parent
    jpath = folder / "transforms.json"
    if not jpath.is_file():
        raise TransformFileError(f"no transforms.json in {folder} (pass a folder written by `flatquant calibrate`)")
    try:
        meta = json.loads(jpath.read_text())
    except json.JSONDecodeError as e:
        raise TransformFileError(f"{jpath} is not valid JSON: {e}") from None
    recorded = meta.get("source_model") if isinstance(meta, dict) else None
    if recorded:
        log.info("model %s (recorded in %s; --model overrides it)", recorded, jpath)
    return recorded or DEFAULT_MODEL


def _load_for_transforms(transforms: Path, given: str | None):
    """``load`` of the model the transforms were calibrated on (``--model`` overrides the recorded one)."""
    source = _source_model(transforms, given)
    try:
        return load(source)
    except ModelLoadError as e:
        if given:
            raise
        raise ModelLoadError(f"{e} (the model recorded with {transforms}; pass --model to use another)") from None


def cmd_export(a: argparse.Namespace) -> int:
    """``flatquant export``."""
    from .models.real.checkpoint import declared_dtype, export_checkpoint

    if not a.shard_gb > 0 or a.shard_gb == float("inf"):
        raise ValueError(f"--shard-gb {a.shard_gb}: the shard size must be a positive number of GB")
    weights, tok = _load_for_transforms(a.transforms, a.model)
    flats, qcfg, tcfg, meta = load_transforms(a.transforms, weights.args)
    dtype = declared_dtype(weights) if a.dtype == "auto" else getattr(torch, a.dtype)
    path = export_checkpoint(weights, flats, qcfg, tcfg, a.out, method=meta.get("method", DEFAULT_METHOD),
                             tokenizer=tok, shard_bytes=int(a.shard_gb * 1e9), dtype=dtype,
                             embed_bits=None if a.embed_bits == 16 else a.embed_bits,
                             extra={"source_model": meta.get("source_model"), "transforms": str(a.transforms)})
    print(f"wrote {path.parent} ({qcfg.tag}, {json.loads(path.read_text())['backend']} backend)")
    return 0


def _load_real(checkpoint: Path, device: str, model: str | None = None):
    """``(real model, tokenizer, device)``; the tokenizer comes from ``model`` when the checkpoint has none."""
    from .models.real.checkpoint import CheckpointError, load_checkpoint, load_tokenizer

    dev = resolve_device(device)
    real = load_checkpoint(checkpoint, dev)
    if model is not None and not (Path(checkpoint) / "tokenizer").is_dir():
        log.info("%s holds no tokenizer: using the one of %s", checkpoint, model)
        return real, load(model)[1], dev
    try:
        return real, load_tokenizer(checkpoint), dev
    except CheckpointError:
        raise CheckpointError(f"{checkpoint} holds no tokenizer; pass --model with the model it was exported from "
                              "(its tokenizer is used)") from None


def cmd_generate(a: argparse.Namespace) -> int:
    """``flatquant generate``: stream tokens as they are produced (the unquantized model without --checkpoint)."""
    gcfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    if a.checkpoint is None and a.model is None:
        raise ValueError("generate needs --checkpoint CKPT (a folder written by `flatquant export`) or --model M "
                         "(the unquantized model)")
    if a.checkpoint is None:
        dev = resolve_device(a.device)
        weights, tok = load(a.model)
        model = fp_model(weights, dev)
        log.info("generating with the unquantized model %s (%s)", a.model, model.cfg.dtype)
    else:
        model, tok, dev = _load_real(a.checkpoint, a.device, a.model)
    text = a.prompt
    if a.chat:
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(dev)
    gen = torch.Generator(device=dev).manual_seed(gcfg.seed)
    out: list[int] = []
    shown = ""
    sys.stdout.write(a.prompt + ("\n" if a.chat else ""))
    sys.stdout.flush()
    t0 = time.time()
    t_first = None
    for nxt in model.generate(ids, gcfg.max_new_tokens, temperature=gcfg.temperature, top_p=gcfg.top_p,
                              eos_token_id=tok.eos_token_id, generator=gen):
        if t_first is None:
            t_first = time.time()
        tid = int(nxt[0])
        if tid == tok.eos_token_id:
            break
        out.append(tid)
        full = tok.decode(out, skip_special_tokens=True)
        sys.stdout.write(full[len(shown):])
        sys.stdout.flush()
        shown = full
    end = time.time()
    sys.stdout.write("\n")
    first = (t_first or end) - t0
    steady = max(len(out) - 1, 0)
    log.info("first token after %.1fs (prefill, plus kernel compilation and graph capture on a first run); "
             "%d tokens, %.1f tokens/s after it (%s)", first, len(out), steady / max(end - (t_first or end), 1e-9),
             dev)
    return 0


def cmd_eval_real(a: argparse.Namespace) -> int:
    """``flatquant eval --real --checkpoint CKPT``: perplexity on the real path."""
    if a.checkpoint is None:
        raise ValueError("--real needs --checkpoint (a folder written by `flatquant export`)")
    _check_inputs(a, evaluate=True)
    model, tok, _ = _load_real(a.checkpoint, a.device, a.model)
    windows = _test_windows(a, tok, model.cfg.args.bos_token_id)
    t0 = time.time()
    ppl = perplexity_from_nlls(real_window_nlls(model, windows), "real-path perplexity")
    row = {"method": "real", "bits": model.cfg.qcfg.tag, "ppl": ppl, "calib_seconds": 0.0,
           "eval_seconds": time.time() - t0, "key": ""}
    if a.out is not None:
        _write_results(a.out, [row], {"command": " ".join(sys.argv), "eval_windows": int(windows.shape[0]),
                                      "checkpoint": str(a.checkpoint)})
    print(_table([row]))
    return 0


def cmd_lm_eval(a: argparse.Namespace) -> int:
    """``flatquant lm-eval``."""
    import tempfile

    from .evaluation.lmeval import run_lm_eval
    from .models.hf_real import FakeModel, FlatQuantForCausalLM

    for flag, value, low in (("--limit", a.limit, 1), ("--batch-size", a.batch_size, 1),
                             ("--num-fewshot", a.num_fewshot, 0), ("--cloze-docs", a.cloze_docs, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}")
    if a.checkpoint is not None:
        model, tok, _ = _load_real(a.checkpoint, a.device, a.model)
    else:
        device = resolve_device(a.device)
        weights, tok = _load_for_transforms(a.transforms, a.model)
        flats, qcfg, tcfg, meta = load_transforms(a.transforms, weights.args)
        model = FakeModel(from_transforms(weights, flats, qcfg, tcfg, meta["method"]).weights.to(device), qcfg)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    with tempfile.TemporaryDirectory() as work:
        res = run_lm_eval(FlatQuantForCausalLM.wrap(model, tok), tok, tasks, workdir=Path(work), limit=a.limit,
                          batch_size=a.batch_size, num_fewshot=a.num_fewshot, cloze_source=a.cloze_data,
                          cloze_docs=a.cloze_docs)
    path = "real" if a.checkpoint is not None else "fake"
    for task, metrics in res.items():
        print(f"{task} ({path}): " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "lm_eval.json").write_text(json.dumps({"path": path, "tasks": tasks, "results": res,
                                                         "command": " ".join(sys.argv)}, indent=1))
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
                "plot": cmd_plot, "export": cmd_export, "generate": cmd_generate, "lm-eval": cmd_lm_eval}
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
