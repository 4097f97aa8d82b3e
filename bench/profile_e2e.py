"""Per-kernel profile of our engines end to end: where one prefill and a few decode steps spend GPU time.

Called by ``bench/bench_e2e.py --profile`` (same model options: ``--tiny``, ``--layers``, ``--prefill``):
for each engine of ``--profile-engines`` (default ``real-w4a4kv4``) and batch size of ``--profile-batches``
(default 1,16) it warms the engine up at the profiled shapes (Triton compilation and autotuning stay outside the
trace), then runs torch.profiler over one prefill of ``--prefill`` tokens and, separately, over
``--profile-steps`` decode steps after it. Decode runs eagerly by default so that every kernel launch is its own
event; ``--profile-graph`` profiles CUDA-graph replay instead (recent CUPTI reports the kernels inside a graph,
but check that the table is not just one ``cudaGraphLaunch``).

Kernel times are the profiler's device self times (µs) summed by kernel name; on a CPU-only run (smoke test)
the CPU self times of the operators stand in for them. Written to ``<--profile-dir>/profile_e2e_<tag>.md``
(top ``TOP`` kernels per phase: name, calls, total µs, µs per layer — per layer and step for decode — and share)
and ``.json`` (every kernel). ``µs per layer`` is the phase total divided by the number of layers, so
embedding, final norm and lm_head kernels are spread over the layers too; they are listed by name.

Example (GPU): ``PYTHONPATH=. python bench/bench_e2e.py --profile --profile-tag h200``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from flatquant.models.args import ModelArgs

log = logging.getLogger("profile_e2e")
TOP = 25
"""Kernels listed per phase in the markdown table (the JSON has all of them)."""


def kernel_times(prof: torch.profiler.profile, device: torch.device) -> list[dict]:
    """Per-name totals of one trace: ``name``, ``calls``, ``total_us`` (device self time; CPU self time on CPU).

    Sorted by total time, largest first.
    """
    out = []
    for e in prof.key_averages():
        if device.type == "cuda":
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:  # older torch
                t = getattr(e, "self_cuda_time_total", 0.0)
        else:
            t = e.self_cpu_time_total
        if t > 0:
            out.append({"name": e.key, "calls": int(e.count), "total_us": float(t)})
    return sorted(out, key=lambda r: -r["total_us"])


def _trace(fn, device: torch.device) -> tuple[torch.profiler.profile, float]:
    """Run ``fn`` once under torch.profiler; returns the profile and the wall time (s, synchronised)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch_profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    return prof, wall


@torch.no_grad()
def profile_runner(runner, args: ModelArgs, device: torch.device, batch: int, prefill: int, steps: int) -> dict:
    """Kernel tables of one prefill and ``steps`` decode steps of an :class:`OursRunner` at one batch size."""
    from bench_e2e import _prompt

    tokens = _prompt(args, batch, prefill, device)
    max_len = prefill + 2 * steps + 4
    # warm-up at the profiled shapes: prefill, then decode steps (graph capture, if any, happens here)
    logits, cache = runner.prefill(tokens, max_len)
    nxt = logits.argmax(-1)
    for _ in range(2):
        nxt = runner.step(nxt, cache).argmax(-1)
    prof, pre_wall = _trace(lambda: runner.prefill(tokens, max_len), device)
    pre = kernel_times(prof, device)
    logits, cache = runner.prefill(tokens, max_len)
    state = {"nxt": runner.step(logits.argmax(-1), cache).argmax(-1)}  # first step (graph capture) untraced

    def decode() -> None:
        for _ in range(steps):
            state["nxt"] = runner.step(state["nxt"], cache).argmax(-1)

    prof, dec_wall = _trace(decode, device)
    dec = kernel_times(prof, device)
    n = args.n_layers
    for r in pre:
        r["us_per_layer"] = r["total_us"] / n
    for r in dec:
        r["us_per_layer_step"] = r["total_us"] / (n * steps)
    return {"batch": batch, "prefill_tokens": prefill, "decode_steps": steps, "layers": n,
            "prefill_wall_ms": 1e3 * pre_wall, "decode_wall_ms_per_step": 1e3 * dec_wall / steps,
            "prefill_kernel_us": sum(r["total_us"] for r in pre),
            "decode_kernel_us_per_step": sum(r["total_us"] for r in dec) / steps,
            "prefill": pre, "decode": dec}


def _md_name(name: str, width: int = 100) -> str:
    name = name.replace("|", "/").replace("\n", " ")
    return name if len(name) <= width else name[: width - 1] + "…"


def markdown(result: dict) -> str:
    """The profile tables as markdown."""
    env = result["env"]
    unit = "device" if result["device"] == "cuda" else "CPU (operators, no GPU)"
    lines = [f"# End-to-end kernel profile ({env.get('gpu')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')})", "",
             f"`{env.get('command')}`", "",
             f"Model: {result['model']}. Times are {unit} self times summed by name, µs; per layer = total / "
             f"{result['layers']} layers (embedding and lm_head kernels included in the total). Decode "
             f"{'replayed from a CUDA graph' if result['graph'] else 'eager (one launch per kernel)'}.", ""]
    for eng in result["engines"]:
        if "error" in eng:
            lines += [f"## {eng['engine']}: error", "", f"`{eng['error']}`", ""]
            continue
        for run in eng["runs"]:
            if "error" in run:
                lines += [f"## {eng['engine']}, batch {run['batch']}: error", "", f"`{run['error']}`", ""]
                continue
            b, s = run["batch"], run["decode_steps"]
            lines += [f"## {eng['engine']}, batch {b}: prefill {run['prefill_tokens']} tokens", "",
                      f"Wall {run['prefill_wall_ms']:.1f} ms (under the profiler); kernels "
                      f"{run['prefill_kernel_us'] / 1e3:.1f} ms.", "",
                      "| kernel | calls | total µs | µs per layer | share |", "|---|---|---|---|---|"]
            tot = max(run["prefill_kernel_us"], 1e-9)
            for r in run["prefill"][:TOP]:
                lines.append(f"| {_md_name(r['name'])} | {r['calls']} | {r['total_us']:.1f} | "
                             f"{r['us_per_layer']:.1f} | {100 * r['total_us'] / tot:.1f}% |")
            lines += ["", f"## {eng['engine']}, batch {b}: {s} decode steps", "",
                      f"Wall {run['decode_wall_ms_per_step']:.2f} ms/step (under the profiler); kernels "
                      f"{run['decode_kernel_us_per_step']:.1f} µs/step.", "",
                      "| kernel | calls | total µs | µs per layer per step | share |", "|---|---|---|---|---|"]
            tot = max(run["decode_kernel_us_per_step"] * s, 1e-9)
            for r in run["decode"][:TOP]:
                lines.append(f"| {_md_name(r['name'])} | {r['calls']} | {r['total_us']:.1f} | "
                             f"{r['us_per_layer_step']:.2f} | {100 * r['total_us'] / tot:.1f}% |")
            lines.append("")
    return "\n".join(lines)


def _default_tag(device: torch.device, tiny: bool) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        m = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name)
        tag = (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name)).lower()
    else:
        tag = "cpu"
    return tag + ("_tiny" if tiny else "")


def profile(a: argparse.Namespace, device: torch.device, args: ModelArgs) -> dict:
    """Profile every engine of ``a.profile_engines`` at every batch of ``a.profile_batches``; write .md + .json."""
    from bench_e2e import _error_row, _free_compiled, engine_builders, parse_engines
    from env import environment

    builders = engine_builders(args, device)
    graph = bool(a.profile_graph) and device.type == "cuda"
    result: dict = {"env": environment(), "device": device.type, "graph": graph, "layers": args.n_layers,
                    "model": ("tiny" if a.tiny else "LLaMA-3-8B shape") + f", {args.n_layers} layers, random weights",
                    "engines": []}
    for name in parse_engines(a.profile_engines):
        log.info("profiling %s", name)
        try:
            runner = builders[name]()
            if not hasattr(runner, "step"):
                raise TypeError(f"{name} runs through transformers' generate; only step-wise engines are profiled")
            if hasattr(runner, "graph"):
                runner.graph = graph
        except Exception as e:
            result["engines"].append(_error_row(name, None, e))
            _free_compiled(device)
            continue
        runs = []
        for b in [int(x) for x in a.profile_batches.split(",")]:
            try:
                runs.append(profile_runner(runner, args, device, b, a.prefill, a.profile_steps))
                log.info("%s batch %d: prefill %.1f ms of kernels, decode %.1f µs/step", name, b,
                         runs[-1]["prefill_kernel_us"] / 1e3, runs[-1]["decode_kernel_us_per_step"])
            except Exception as e:
                log.error("%s batch %d failed: %s", name, b, e)
                runs.append(_error_row(name, b, e))
        result["engines"].append({"engine": name, "runs": runs})
        del runner
        _free_compiled(device)
    tag = a.profile_tag or _default_tag(device, a.tiny)
    out = Path(a.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(result)
    (out / f"profile_e2e_{tag}.md").write_text(md + "\n")
    (out / f"profile_e2e_{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    log.info("wrote %s and .json", out / f"profile_e2e_{tag}.md")
    print(md)
    return result
