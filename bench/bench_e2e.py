"""End-to-end benchmark: the real W4A4KV4 model against every baseline in one run, and real-path vs fake-path PPL.

Speed (random weights, as the paper's benchmarks): a LLaMA-3-8B-shaped model (``--shape llama2-7b``: LLaMA-2-7B's,
whose down_proj reads K = 11008), prefill ``--prefill`` tokens
(default 2048) then ``--decode`` greedy steps (default 256; 64 with ``--quick``) at each batch size of ``--batches``
(default 1,4,16; 1,16 with ``--quick``). Engines (``--engines``, default all of them, built one after the other and
freed, so peaks do not overlap):

* ``real-w4a4kv4``: :class:`flatquant.models.real.RealModel` built directly from random packed int4 weights, random
  orthogonal online transforms and a packed KV4 cache (no fp32 weights are ever materialised), decode steps
  replayed from a CUDA graph;
* ``real-w4a4kv4-eager``: the same without CUDA-graph replay of the decode steps (per-op launches);
* ``ours-bf16``: the same engine with bf16 linears and a bf16 KV cache (fake path with quantization off);
* baselines, all on a random-weight ``transformers`` ``LlamaForCausalLM`` in bf16 with SDPA attention:

  - ``hf-bf16-static``: ``model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
    cache_implementation="static")``. transformers compiles the decode step itself on CUDA (``torch.compile``,
    mode "reduce-overhead"; the first call at each batch size takes ~30-55 s on the H200, excluded and reported as
    ``warmup_s``); on CPU transformers does not compile, so the CPU rows are eager;
  - ``torchao-fp8`` / ``torchao-int4``: the same generate path after torchao's ``quantize_`` with
    ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` / ``Int4WeightOnlyConfig(group_size=128,
    int4_packing_format="tile_packed_to_4d")`` on every decoder linear (lm_head stays bf16). torchao is optional
    (``pip install -e .[bench]``; on the GPU machine carry the wheel from ``scripts/fetch_bench_wheels.sh``); when
    it is missing or fails, the engine's row is an error row and the run goes on;
  - ``hf-bf16-eager``: a plain forward loop with transformers' default dynamic cache (no compilation; the old
    ``hf-bf16-sdpa`` name is accepted as an alias).

How the generate-path rows are timed: a no-op ``LogitsProcessor`` stamps every generated token (a CUDA event on
CUDA, ``perf_counter`` on CPU; transformers runs logits processors eagerly, outside the compiled forward). After
one warm-up ``generate`` of the timed shape (compilation, CUDA-graph recording), prefill latency is the median
wall time of ``--repeats`` calls of ``generate(max_new_tokens=1)`` (synchronised; it includes generate's own
set-up and the static-cache allocation, as a user sees it), and decode ms/step is the interval between the stamps
of token 2 and token ``n = decode + 1`` of one ``generate(max_new_tokens=n)`` divided by ``decode - 1`` steps (the
same number of timed steps as the other engines, whose first decode step is a warm-up). That interval holds only
decode forwards, the argmax and generate's per-step bookkeeping, none of the set-up or prefill. As a cross-check
each row also has ``decode_ms_per_step_wall`` = (wall time of that generate - prefill latency) / decode. The static
cache keeps the longest length of previous calls, so the prefill-only calls reuse the compiled decode's shapes.

Each row: prefill latency, decode ms/step and tokens/s, peak allocated memory over a prefill + decode, and the
KV-cache bytes (static cache: its layers' key/value tensors, sized prefill + decode + 1). Speed-ups are computed
only against the strongest baseline of the same run at that batch size — the fastest of ``hf-bf16-static``,
``torchao-*`` and ``hf-bf16-eager``, separately for prefill and for decode — and the table names which baseline
that was; peak-memory and KV ratios are against the bf16 static-cache baseline (else the eager one). The JSON is
rewritten after every row, so a run cut short by a time limit keeps what it measured, and ``--resume`` continues it:
the same command again runs only the (engine, batch) pairs that are not yet in ``--out`` (rows with errors, e.g.
past ``--budget-s``, are run again; same settings and GPU, not with ``--merge``/``--profile``/``--skip-speed``;
the earlier ``ppl`` is kept unless measured again), and records the earlier runs' environments as ``earlier_runs``.
``--merge`` joins the JSONs of several runs on one machine (e.g. engines split across calls) and recomputes the
comparison.

``--profile``: instead of the speed table, torch.profiler over one prefill and a few decode steps of
``--profile-engines`` (default ``real-w4a4kv4``) at batch 1 and 16; see ``bench/profile_e2e.py``.

Accuracy (``--ppl-transforms DIR``, e.g. ``bench/results/transforms_smollm2_w4a4kv4_4ep``): exports the
checkpoint to a temporary folder and compares the real-path PPL (Triton ops on CUDA, reference ops on CPU) with
the fake-path PPL on the first ``--ppl-windows`` windows of the held-out corpus (each path's per-window mean NLL is
kept as ``*_window_nll``). ``--ppl-paths`` picks the paths
(default ``fake,real``); ``perturbed`` adds the fake path with its input embeddings × (1 + ``--ppl-perturb``,
default 1e-6): the spread that 4-bit codes at rounding ties give the fake path itself, against which a real-vs-fake
gap is judged (docs/real.md).

Usage (GPU): ``PYTHONPATH=. python bench/bench_e2e.py --out bench/results/e2e_h200.json``;
CPU smoke run: ``PYTHONPATH=. python bench/bench_e2e.py --device cpu --tiny --out /tmp/e2e.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402

from flatquant.core.spec import QuantConfig  # noqa: E402
from flatquant.models.args import LINEARS, ModelArgs  # noqa: E402
from flatquant.models.random import LLAMA2_7B, LLAMA3_8B, random_real_tensors  # noqa: E402
from flatquant.models.real import (  # noqa: E402
    RealConfig,
    RealModel,
    RealWeights,
    layer_from_tensors,
)
from flatquant.presets import bits_preset  # noqa: E402

log = logging.getLogger("bench_e2e")
TINY = ModelArgs(vocab_size=512, hidden=128, intermediate=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32)


def random_real_model(args: ModelArgs, qcfg: QuantConfig, device: torch.device, *, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16, compile: bool | None = None) -> RealModel:
    """A real model with random packed weights and random orthogonal online transforms (checkpoint schema,
    :func:`flatquant.models.random.random_real_tensors`)."""
    top, tensors = random_real_tensors(args, generator=torch.Generator().manual_seed(seed), device=device, dtype=dtype)
    cfg = RealConfig(args=args, qcfg=qcfg, dtype=dtype, real_linears=True)
    return RealModel(RealWeights(cfg=cfg, top=top, layers=tuple(layer_from_tensors(t, cfg) for t in tensors)),
                     compile_decode=compile, compile_prefill=compile)


def _top(args: ModelArgs, gd: torch.Generator, device: torch.device, dtype: torch.dtype) -> dict:
    inv = 1.0 / 500000.0 ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    return {"embed": torch.randn(args.vocab_size, args.hidden, generator=gd, device=device).to(dtype),
            "final_norm": torch.ones(args.hidden, dtype=dtype, device=device),
            "lm_head": (torch.randn(args.vocab_size, args.hidden, generator=gd, device=device) * 0.02).to(dtype),
            "rope.inv_freq": inv.to(device)}


def random_bf16_engine(args: ModelArgs, device: torch.device, *, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16) -> RealModel:
    """Our engine with unquantized bf16 linears and a bf16 KV cache."""
    gd = torch.Generator(device=device).manual_seed(seed)
    cfg = RealConfig(args=args, qcfg=QuantConfig(), dtype=dtype, real_linears=False)
    layers = []
    for _ in range(args.n_layers):
        t = {"input_norm": torch.ones(args.hidden, dtype=dtype, device=device),
             "post_norm": torch.ones(args.hidden, dtype=dtype, device=device)}
        for n in LINEARS:
            o, k = args.linear_shapes[n]
            t[f"{n}.weight"] = (torch.randn(o, k, generator=gd, device=device) * 0.02).to(dtype)
        layers.append(layer_from_tensors(t, cfg))
    return RealModel(RealWeights(cfg=cfg, top=_top(args, gd, device, dtype), layers=tuple(layers)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _free_compiled(device: torch.device) -> None:
    """Drop torch.compile's caches and CUDA-graph pools of the engine just freed (transformers' compiled decode)."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception as e:  # never fatal: only memory and the recompile counters are at stake
        log.warning("torch._dynamo.reset failed: %s", e)
    _peak_reset(device)


class OursRunner:
    """Prefill/decode of a :class:`RealModel`; ``graph`` replays each decode step from a CUDA graph."""

    def __init__(self, model: RealModel, graph: bool = False) -> None:
        self.model, self.graph = model, graph

    def prefill(self, tokens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, object]:
        if self.graph:  # the engine's static cache and a prefill graph per shape (the deployed fast path)
            cache = self.model.static_cache(tokens.shape[0], max_len)
            return self.model.prefill_graphed(tokens, cache), cache
        cache = self.model.new_cache(tokens.shape[0], max_len)
        return self.model.forward(tokens, cache, last_only=True)[:, -1], cache

    def step(self, nxt: torch.Tensor, cache: object) -> torch.Tensor:
        if not self.graph:
            return self.model.forward(nxt[:, None], cache)[:, -1]
        return self.model.graphed_decoder(cache).step(nxt)

    @staticmethod
    def cache_bytes(cache: object) -> int:
        return cache.nbytes()


class HFRunner:
    """Prefill/decode of a transformers causal LM with its default cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, object]:
        out = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    @torch.no_grad()
    def step(self, nxt: torch.Tensor, cache: object) -> torch.Tensor:
        return self.model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True).logits[:, -1]

    @staticmethod
    def cache_bytes(cache: object) -> int:
        return _cache_kv_bytes(cache)


STATIC_ENGINES = ("hf-bf16-static", "torchao-fp8", "torchao-int4")
"""Engines timed through transformers' ``generate(cache_implementation="static")``."""
BASELINES = (*STATIC_ENGINES, "hf-bf16-eager")
"""Engines the speed-ups are computed against (the fastest of them per batch size and phase)."""
BF16_REFERENCES = ("hf-bf16-static", "hf-bf16-eager")
"""bf16 engines the peak-memory and KV ratios are computed against, first present wins."""
ENGINES = ("real-w4a4kv4", "real-w4a4kv4-eager", "ours-bf16", *BASELINES)
ALIASES = {"hf-bf16-sdpa": "hf-bf16-eager"}
"""Old engine names still accepted on the command line."""


def hf_model(args: ModelArgs, device: torch.device) -> torch.nn.Module:
    """Random-weight ``LlamaForCausalLM`` in bf16 with SDPA attention, set up for fixed-length greedy generate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.rms_eps,
                      max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa",
                      eos_token_id=None, pad_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    gc_ = model.generation_config
    gc_.eos_token_id, gc_.pad_token_id = None, 0  # never stop early; a pad id silences generate's warning
    return model.eval()


def torchao_quantize(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Quantize every decoder linear of ``model`` in place with torchao (``kind``: ``fp8`` or ``int4``).

    fp8: dynamic per-row float8 activations and per-row float8 weights; int4: weight-only, groups of 128, the
    ``tile_packed_to_4d`` layout (tinygemm). lm_head stays bf16. torchao is imported here, so a missing or
    incompatible torchao fails only this engine.
    """
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int4WeightOnlyConfig,
            PerRow,
            quantize_,
        )
    except ImportError as e:
        raise ImportError(f"torchao is not installed ({e}); pip install -e .[bench], or on the GPU machine carry "
                          ".whl from scripts/fetch_bench_wheels.sh") from e
    if kind == "fp8":
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    elif kind == "int4":
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    else:
        raise ValueError(f"unknown torchao kind {kind!r}")

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and "lm_head" not in fqn

    quantize_(model, config, filter_fn=keep)
    return model


def _cache_kv_bytes(cache: object) -> int:
    """Bytes of a transformers cache's layer key/value tensors (static or dynamic cache)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _TokenStamps:
    """A no-op logits processor that records when each generated token's logits are ready.

    On CUDA it records an event on the current stream (no synchronisation, so it does not change the timing it
    measures); on CPU it reads ``perf_counter`` (CPU ops run synchronously). :meth:`intervals_ms` converts the
    stamps to milliseconds after the first stamp.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.stamps.append(ev)
        else:
            self.stamps.append(time.perf_counter())
        return scores

    def ms_between(self, i: int, j: int) -> float:
        """Milliseconds from stamp ``i`` to stamp ``j`` (synchronises on CUDA)."""
        if self.device.type == "cuda":
            self.stamps[j].synchronize()
            return self.stamps[i].elapsed_time(self.stamps[j])
        return 1e3 * (self.stamps[j] - self.stamps[i])


def _as_logits_processor(stamps: _TokenStamps) -> object:
    """``stamps`` as a transformers ``LogitsProcessor`` (generate accepts only instances of that class)."""
    from transformers import LogitsProcessor

    class TokenStamps(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return stamps(input_ids, scores)

    return TokenStamps()


class HFGenerateRunner:
    """transformers ``generate(cache_implementation="static")`` on one model: measures a whole row itself.

    ``generate`` runs prefill and decode in one call, so this runner cannot be driven step by step like
    :class:`OursRunner`; :meth:`measure` returns the same row fields as :func:`measure` (see the module docstring
    for the timing method) plus ``warmup_s`` (the first call at this shape: compilation) and
    ``decode_ms_per_step_wall``.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, n: int, stamps: _TokenStamps | None = None,
                 return_cache: bool = False) -> object:
        """Greedy ``generate`` of exactly ``n`` new tokens with a static cache."""
        from transformers import LogitsProcessorList

        procs = LogitsProcessorList([_as_logits_processor(stamps)] if stamps is not None else [])
        return self.model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, cache_implementation="static",
                                   logits_processor=procs, return_dict_in_generate=return_cache)

    def _timed(self, fn: Callable[[], object]) -> tuple[float, object]:
        _sync(self.device)
        t0 = time.perf_counter()
        out = fn()
        _sync(self.device)
        return time.perf_counter() - t0, out

    def measure(self, args: ModelArgs, batch: int, prefill: int, decode: int, repeats: int) -> dict:
        """One row at one batch size (same prompt tokens as :func:`measure`)."""
        device = self.device
        tokens = _prompt(args, batch, prefill, device)
        n = decode + 1
        warm, out = self._timed(lambda: self.generate(tokens, n, return_cache=True))
        cache = out.get("cache") if hasattr(out, "get") else None
        if cache is None:  # older transformers name the field past_key_values
            cache = out.get("past_key_values") if hasattr(out, "get") else None
        kv = _cache_kv_bytes(cache if cache is not None else getattr(self.model, "_cache", None))
        del out, cache
        log.info("generate warm-up (compilation) at batch %d: %.1f s", batch, warm)
        times = [self._timed(lambda: self.generate(tokens, 1))[0] for _ in range(repeats)]
        pre = statistics.median(times)
        _peak_reset(device)
        stamps = _TokenStamps(device)
        wall, seq = self._timed(lambda: self.generate(tokens, n, stamps))
        if len(stamps.stamps) != n or seq.shape[1] != prefill + n:
            raise RuntimeError(f"generate made {seq.shape[1] - prefill} tokens ({len(stamps.stamps)} stamps), "
                               f"expected {n}")
        steps = max(decode - 1, 1)
        dt = stamps.ms_between(1, n - 1) / 1e3 if n > 2 else wall - pre
        return {"batch": batch, "prefill_ms": 1e3 * pre, "prefill_tok_s": batch * prefill / pre,
                "decode_ms_per_step": 1e3 * dt / steps, "decode_tok_s": batch * steps / max(dt, 1e-9),
                "peak_mem_gb": _peak(device) / 1e9, "kv_cache_bytes": kv, "warmup_s": warm,
                "decode_ms_per_step_wall": 1e3 * (wall - pre) / max(decode, 1)}


def _prompt(args: ModelArgs, batch: int, prefill: int, device: torch.device) -> torch.Tensor:
    """The random prompt of one batch size (the same for every engine)."""
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, args.vocab_size, (batch, prefill), generator=g).to(device)


@torch.no_grad()
def measure(runner, args: ModelArgs, device: torch.device, batch: int, prefill: int, decode: int,
            repeats: int) -> dict:
    """Prefill latency (median), decode time, tokens/s, peak memory and KV-cache bytes at one batch size."""
    if isinstance(runner, HFGenerateRunner):
        return runner.measure(args, batch, prefill, decode, repeats)
    tokens = _prompt(args, batch, prefill, device)
    max_len = prefill + decode
    runner.prefill(tokens, max_len)  # warm-up at the timed shape: compilation, autotuning, graph capture
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        runner.prefill(tokens, max_len)
        _sync(device)
        times.append(time.perf_counter() - t0)
    _peak_reset(device)
    logits, cache = runner.prefill(tokens, max_len)
    nxt = logits.argmax(-1)
    nxt = runner.step(nxt, cache).argmax(-1)  # decode warm-up (first-step compilation)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(decode - 1):
        nxt = runner.step(nxt, cache).argmax(-1)
    _sync(device)
    dt = time.perf_counter() - t0
    steps = max(decode - 1, 1)
    return {"batch": batch, "prefill_ms": 1e3 * statistics.median(times),
            "prefill_tok_s": batch * prefill / statistics.median(times),
            "decode_ms_per_step": 1e3 * dt / steps, "decode_tok_s": batch * steps / max(dt, 1e-9),
            "peak_mem_gb": _peak(device) / 1e9, "kv_cache_bytes": runner.cache_bytes(cache)}


SHAPES = {"llama3-8b": LLAMA3_8B, "llama2-7b": LLAMA2_7B}  # --shape: LLaMA-2-7B's down_proj has K = 11008, no GQA


def model_args(a: argparse.Namespace) -> ModelArgs:
    """The benchmark's architecture: ``--shape`` (default LLaMA-3-8B; or the tiny smoke-test model), ``--layers``
    overriding."""
    args = TINY if a.tiny else SHAPES[a.shape]
    if a.layers:
        args = ModelArgs(**{**args.to_dict(), "n_layers": a.layers})
    return args


def engine_builders(args: ModelArgs, device: torch.device) -> dict[str, Callable[[], object]]:
    """Name -> a function building that engine's runner."""
    graph = device.type == "cuda"

    def ao(kind: str) -> HFGenerateRunner:
        return HFGenerateRunner(torchao_quantize(hf_model(args, device), kind), device)

    return {
        "real-w4a4kv4": lambda: OursRunner(random_real_model(args, bits_preset("w4a4kv4"), device), graph),
        "real-w4a4kv4-eager": lambda: OursRunner(
            random_real_model(args, bits_preset("w4a4kv4"), device, compile=False)),
        "ours-bf16": lambda: OursRunner(random_bf16_engine(args, device), graph),
        "hf-bf16-static": lambda: HFGenerateRunner(hf_model(args, device), device),
        "torchao-fp8": lambda: ao("fp8"),
        "torchao-int4": lambda: ao("int4"),
        "hf-bf16-eager": lambda: HFRunner(hf_model(args, device)),
    }


def parse_engines(spec: str) -> list[str]:
    """Comma-separated engine names (aliases resolved, order kept, duplicates dropped); unknown names raise."""
    out: list[str] = []
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        name = ALIASES.get(name, name)
        if name not in ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
        if name not in out:
            out.append(name)
    return out


def _error_row(engine: str, batch: int | None, e: BaseException) -> dict:
    row: dict = {"engine": engine, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                 "traceback": traceback.format_exc(limit=4)}
    if batch is not None:
        row["batch"] = batch
    return row


def speed(a: argparse.Namespace, device: torch.device,
          on_row: Callable[[list[dict]], None] | None = None, prior: list[dict] | None = None) -> list[dict]:
    """All engines × batch sizes; ``on_row(rows)`` is called after every row (to save partial results). ``prior``:
    rows already measured (``--resume``), kept first; their (engine, batch) pairs are not run again."""
    args = model_args(a)
    builders = engine_builders(args, device)
    try:  # several compiled models (and batch sizes) must not exhaust dynamo's per-code recompile limit
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    except Exception as e:
        log.warning("could not raise torch._dynamo's recompile limit: %s", e)
    batches = [int(x) for x in a.batches.split(",")]
    t_start = time.monotonic()
    rows: list[dict] = list(prior or [])
    done = {(r["engine"], r["batch"]) for r in rows}

    def add(row: dict) -> None:
        rows.append(row)
        log.info("%s", {k: v for k, v in row.items() if k != "traceback"})
        if on_row is not None:
            on_row(rows)

    for name in parse_engines(a.engines):
        todo = [b for b in batches if (name, b) not in done]
        if not todo:
            log.info("%s: every batch size already measured (--resume)", name)
            continue
        if a.budget_s and time.monotonic() - t_start > a.budget_s:
            add({"engine": name, "error": f"skipped: past --budget-s {a.budget_s:g}"})
            continue
        log.info("building %s", name)
        try:
            runner = builders[name]()
        except Exception as e:  # keep going: one engine failing must not lose the others
            log.error("%s: build failed: %s", name, e)
            add(_error_row(name, None, e))
            _free_compiled(device)
            continue
        for b in todo:
            if a.budget_s and time.monotonic() - t_start > a.budget_s:
                add({"engine": name, "batch": b, "error": f"skipped: past --budget-s {a.budget_s:g}"})
                continue
            try:
                add({"engine": name, **measure(runner, args, device, b, a.prefill, a.decode, a.repeats)})
            except Exception as e:
                log.error("%s batch %d failed: %s", name, b, e)
                add(_error_row(name, b, e))
        del runner
        _free_compiled(device)
    compare(rows)
    return rows


def _ok(r: dict) -> bool:
    return "error" not in r and "batch" in r


def _measured(r: dict) -> dict:
    """A speed row without the fields :func:`compare` derives from the other rows (for --merge and --resume, which
    recompute them over the joined rows)."""
    return {k: v for k, v in r.items() if not k.endswith(("_speedup", "_baseline", "_ratio", "bf16_reference"))}


RESUME_KEYS = ("device", "tiny", "shape", "layers", "prefill", "decode", "repeats")  # a resumed run shares these
RESUME_DEFAULTS = {"shape": "llama3-8b"}  # settings added later: what a JSON written before them was measured with


def resume_rows(a: argparse.Namespace, env: dict) -> tuple[list[dict], list[dict], dict]:
    """``--resume``: the rows measured without error in ``--out`` by an earlier run of the same settings on the same
    GPU (``env``: this run's :func:`environment`), the environments of the runs that wrote it, and its other results
    that this run keeps unless it measures them again (``ppl``). A missing file starts afresh; other settings or a
    malformed file are refused in one line."""
    if a.out is None:
        raise SystemExit("--resume needs --out: the JSON of the run to continue")
    if not a.out.exists():
        log.info("--resume: %s does not exist yet; starting afresh", a.out)
        return [], [], {}
    try:
        old = json.loads(a.out.read_text())
        old_args, old_rows = old["args"], old.get("speed", [])
        if not isinstance(old_args, dict) or not isinstance(old_rows, list):
            raise TypeError("args must be an object and speed a list")
        if not isinstance(old.get("env", {}), dict) or not isinstance(old.get("earlier_runs", []), list):
            raise TypeError("env must be an object and earlier_runs a list")
        for r in old_rows:
            if not isinstance(r, dict) or "engine" not in r:
                raise TypeError(f"speed row without an engine: {str(r)[:80]}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--resume: {a.out} is not a bench_e2e JSON ({type(e).__name__}: {e}); pass another --out")
    now = {k: str(v) for k, v in vars(a).items()}
    diff = [f"{k} {old_args.get(k, RESUME_DEFAULTS.get(k))} there, {now[k]} here" for k in RESUME_KEYS
            if old_args.get(k, RESUME_DEFAULTS.get(k)) != now[k]]
    old_gpu = old.get("env", {}).get("gpu")
    if old_gpu != env.get("gpu"):
        diff.append(f"gpu {old_gpu} there, {env.get('gpu')} here")
    if diff:
        raise SystemExit(f"--resume: {a.out} was measured with other settings ({'; '.join(diff)}); "
                         "pass the same ones or another --out")
    rows = [_measured(r) for r in old_rows if _ok(r)]  # the comparison is recomputed over all rows
    log.info("--resume: keeping %d measured rows of %s", len(rows), a.out)
    kept = {k: old[k] for k in ("ppl",) if k in old}
    return rows, [*old.get("earlier_runs", []), old.get("env", {})], kept


def compare(rows: list[dict]) -> dict[int, dict]:
    """Speed-ups of every row against the strongest baseline of its batch size (in place); returns the choices.

    Prefill and decode each pick the fastest of :data:`BASELINES` present without error at that batch size
    (lowest prefill ms; lowest decode ms/step). ``peak_ratio`` / ``kv_ratio`` are against the first of
    :data:`BF16_REFERENCES` present.
    """
    chosen: dict[int, dict] = {}
    for b in sorted({r["batch"] for r in rows if _ok(r)}):
        base = [r for r in rows if _ok(r) and r["batch"] == b and r["engine"] in BASELINES]
        if not base:
            continue
        bp = min(base, key=lambda r: r["prefill_ms"])
        bd = min(base, key=lambda r: r["decode_ms_per_step"])
        ref = next((r for e in BF16_REFERENCES for r in base if r["engine"] == e), None)
        chosen[b] = {"prefill_engine": bp["engine"], "prefill_ms": bp["prefill_ms"],
                     "decode_engine": bd["engine"], "decode_ms_per_step": bd["decode_ms_per_step"],
                     "bf16_reference": ref["engine"] if ref else None}
        for r in rows:
            if not _ok(r) or r["batch"] != b:
                continue
            r["prefill_speedup"] = bp["prefill_ms"] / r["prefill_ms"]
            r["prefill_baseline"] = bp["engine"]
            r["decode_speedup"] = bd["decode_ms_per_step"] / r["decode_ms_per_step"]
            r["decode_baseline"] = bd["engine"]
            if ref is not None:
                r["bf16_reference"] = ref["engine"]
                r["kv_ratio"] = r["kv_cache_bytes"] / max(ref["kv_cache_bytes"], 1)
                r["peak_ratio"] = r["peak_mem_gb"] / ref["peak_mem_gb"] if ref["peak_mem_gb"] > 0 else float("nan")
    return chosen


PPL_PATHS = ("fake", "real", "perturbed")


def ppl_paths(spec: str) -> set[str]:
    """The ``--ppl-paths`` list as a set (spaces allowed); a one-line SystemExit on an unknown name."""
    paths = {p.strip() for p in spec.split(",") if p.strip()}
    if not paths or not paths <= set(PPL_PATHS):
        raise SystemExit(f"--ppl-paths takes a comma-separated subset of {', '.join(PPL_PATHS)}; got {spec!r}")
    return paths


def ppl(a: argparse.Namespace, device: torch.device) -> dict:
    """Real-path vs fake-path perplexity of an exported checkpoint on the first windows of the corpus."""
    from flatquant.api import from_transforms
    from flatquant.data import eval_windows, tokenize_corpus
    from flatquant.evaluation.perplexity import real_window_nlls as window_nlls
    from flatquant.evaluation.perplexity import window_nlls as fake_nlls
    from flatquant.io import load_transforms
    from flatquant.models.hf import load
    from flatquant.models.real.checkpoint import export_checkpoint, load_checkpoint

    weights, tok = load(a.ppl_model)
    flats, qcfg, tcfg, meta = load_transforms(a.ppl_transforms, weights.args)
    fake = from_transforms(weights, flats, qcfg, tcfg, meta["method"]).weights
    windows = eval_windows(tokenize_corpus("wiki-offline", "test", tok, bos_token_id=weights.args.bos_token_id),
                           2048, a.ppl_windows)
    out: dict = {"windows": int(windows.shape[0]), "transforms": str(a.ppl_transforms), "bits": qcfg.tag}
    paths = ppl_paths(a.ppl_paths)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        if "real" in paths:
            storage = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[a.ppl_storage_dtype]
            export_checkpoint(weights, flats, qcfg, tcfg, Path(tmp) / "ck", dtype=storage)
            out["storage_dtype"] = a.ppl_storage_dtype
        for dt in dtypes:
            name = str(dt).removeprefix("torch.")
            if "fake" in paths:
                t0 = time.time()
                nll = fake_nlls(fake.to(dtype=dt), windows, qcfg, device=device)
                out[f"fake_{name}"] = math.exp(nll.mean().item())
                out[f"fake_{name}_s"] = time.time() - t0
                out[f"fake_{name}_window_nll"] = nll.tolist()
            if "perturbed" in paths and dt != torch.float32:
                # a 1e-6 change is far below a 16-bit dtype's resolution: the cast would round it away and report
                # no spread at all
                out[f"fake_perturbed_{name}"] = None
                log.info("perturbed path skipped in %s: --ppl-perturb %g is below its resolution", name,
                         a.ppl_perturb)
            elif "perturbed" in paths:  # input embeddings only (a tied LM head keeps the unscaled tensor)
                bumped = replace(fake, top={**fake.top, "embed": fake.top["embed"] * (1 + a.ppl_perturb)})
                t0 = time.time()
                nll = fake_nlls(bumped.to(dtype=dt), windows, qcfg, device=device)
                out[f"fake_perturbed_{name}"] = math.exp(nll.mean().item())
                out[f"fake_perturbed_{name}_s"] = time.time() - t0
                out[f"fake_perturbed_{name}_window_nll"] = nll.tolist()
                out["perturb"] = a.ppl_perturb
                if "fake" in paths:
                    ratio = out[f"fake_perturbed_{name}"] / out[f"fake_{name}"]
                    out[f"perturbed_vs_fake_{name}_pct"] = 100 * (ratio - 1)
            if "real" not in paths:
                log.info("%s", out)
                continue
            try:
                real = load_checkpoint(Path(tmp) / "ck", device, dtype=dt)
                t0 = time.time()
                nll = window_nlls(real, windows)
                out[f"real_{name}"] = math.exp(nll.mean().item())
                out[f"real_{name}_s"] = time.time() - t0
                out[f"real_{name}_window_nll"] = nll.tolist()
                if "fake" in paths:
                    out[f"real_vs_fake_{name}_pct"] = 100 * (out[f"real_{name}"] / out[f"fake_{name}"] - 1)
                del real
            except Exception:
                out[f"real_{name}_error"] = traceback.format_exc(limit=3)
            log.info("%s", out)
    return out


def _f(x: object, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, int | float) and not (isinstance(x, float) and math.isnan(x)) else "–"


def table(rows: list[dict]) -> str:
    """Markdown tables: one row per engine and batch, then the strongest baseline of each batch size."""
    head = ("| engine | batch | prefill ms | prefill tok/s | decode ms/step | decode tok/s | peak GB | KV MB | "
            "prefill × best | decode × best | peak × bf16 | KV × bf16 |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            msg = r["error"].splitlines()[-1][:100].replace("|", "/")
            lines.append(f"| {r['engine']} | {r.get('batch', '–')} | error: {msg} |" + " |" * 9)
            continue
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prefill_ms']:.1f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['decode_tok_s']:.1f} | {r['peak_mem_gb']:.2f} | "
                     f"{r['kv_cache_bytes'] / 1e6:.4g} | {_f(r.get('prefill_speedup'), '.2f')} | "
                     f"{_f(r.get('decode_speedup'), '.2f')} | {_f(r.get('peak_ratio'), '.2f')} | "
                     f"{_f(r.get('kv_ratio'), '.2f')} |")
    chosen = compare(rows)
    if chosen:
        lines += ["", "Speed-ups (× best) are against the strongest baseline of this run at each batch size:", "",
                  "| batch | prefill baseline | prefill ms | decode baseline | decode ms/step | "
                  "bf16 reference (peak, KV) |",
                  "|---|---|---|---|---|---|"]
        for b, c in chosen.items():
            lines.append(f"| {b} | {c['prefill_engine']} | {c['prefill_ms']:.1f} | {c['decode_engine']} | "
                         f"{c['decode_ms_per_step']:.2f} | {c['bf16_reference'] or '–'} |")
    else:
        lines += ["", "No baseline row without error: no speed-ups."]
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict:
    """Join the speed rows of several JSON outputs (later files win for the same engine and batch)."""
    by_key: dict[tuple, dict] = {}
    envs, commands = [], []
    for p in paths:
        data = json.loads(p.read_text())
        envs.append(data.get("env", {}))
        commands.append(data.get("env", {}).get("command", ""))
        for r in data.get("speed", []):
            r = _measured(r)
            by_key[(r["engine"], r.get("batch"))] = r
    gpus = {e.get("gpu") for e in envs}
    if len(gpus) > 1:
        log.warning("merging runs from different GPUs: %s", sorted(map(str, gpus)))
    rows = list(by_key.values())
    return {"env": environment(), "merged_from": [str(p) for p in paths], "merged_envs": envs,
            "merged_commands": commands, "speed": rows, "baselines": compare(rows)}


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of LLaMA-3-8B (CPU smoke test)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b",
                    help="the random model's architecture (default llama3-8b; llama2-7b: K = 11008 at down_proj)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated engines (default: all of {', '.join(ENGINES)}; real-w4a4kv4 and ours-bf16 "
                         "replay decode steps from a CUDA graph on CUDA, real-w4a4kv4-eager does not)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer decode steps (64), batches 1,16 and 2 repeats unless given explicitly")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,16; --quick 1,16)")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--decode", type=int, default=None, help="decode steps (default 256; --quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed prefills per row (median; default 3; --quick 2)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock seconds after which the remaining engine/batch rows are skipped (error rows)")
    ap.add_argument("--skip-speed", action="store_true", help="only the perplexity comparison")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="join the speed rows of these JSON outputs, recompute the comparison, write --out; no runs")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel torch.profiler tables instead of the speed run (bench/profile_e2e.py)")
    ap.add_argument("--profile-engines", default="real-w4a4kv4", help="engines to profile (default real-w4a4kv4)")
    ap.add_argument("--profile-batches", default="1,16", help="batch sizes to profile (default 1,16)")
    ap.add_argument("--profile-steps", type=int, default=8, help="profiled decode steps (default 8)")
    ap.add_argument("--profile-graph", action="store_true",
                    help="profile decode with CUDA-graph replay (default: eager steps, every kernel launch visible)")
    ap.add_argument("--profile-tag", default=None, help="file tag: profile_e2e_<tag>.md/.json (default from GPU)")
    ap.add_argument("--profile-dir", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="folder of the profile tables (default bench/results)")
    ap.add_argument("--ppl-transforms", type=Path, default=None, help="transforms folder for real-vs-fake PPL")
    ap.add_argument("--ppl-model", default="smollm2-135m", help="model of --ppl-transforms (default smollm2-135m)")
    ap.add_argument("--ppl-windows", type=int, default=20, help="corpus windows of 2048 (default 20)")
    ap.add_argument("--ppl-paths", default="fake,real",
                    help="comma-separated: fake, real, perturbed (the fake path with embeddings x (1 + --ppl-perturb))")
    ap.add_argument("--ppl-storage-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="checkpoint storage dtype of the embeddings (norms and biases are always fp32; auto: the "
                         "weights' own; `flatquant export` stores bf16 for a model that declares bf16)")
    ap.add_argument("--ppl-perturb", type=float, default=1e-6, help="relative embedding perturbation (default 1e-6)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path (rewritten after every row)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run whose JSON is --out: keep its measured rows and run only the missing "
                         "(engine, batch) pairs (same --prefill/--decode/--repeats/--device/--tiny/--layers)")
    a = ap.parse_args()
    a.batches = a.batches or ("1,16" if a.quick else "1,4,16")
    a.decode = a.decode if a.decode is not None else (64 if a.quick else 256)
    a.repeats = a.repeats if a.repeats is not None else (2 if a.quick else 3)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parse_engines(a.engines)  # fail on a typo before anything is built
    ppl_paths(a.ppl_paths)
    if not (math.isfinite(a.ppl_perturb) and a.ppl_perturb > -1):
        raise SystemExit(f"--ppl-perturb must be a finite number above -1, got {a.ppl_perturb}")
    if a.resume and (a.merge or a.profile or a.skip_speed):
        raise SystemExit("--resume continues a speed run; it does not combine with --merge, --profile or --skip-speed "
                         "(they would rewrite --out without its measured rows)")
    if a.merge:
        result = merge(a.merge)
        write_json(a.out, result)
        print(table(result["speed"]))
        return 0
    device = torch.device(a.device)
    result: dict = {"env": environment(), "args": {k: str(v) for k, v in vars(a).items()}}
    if a.profile:
        from profile_e2e import profile

        result["profile"] = profile(a, device, model_args(a))
        write_json(a.out, result)
        return 0
    if not a.skip_speed:
        prior: list[dict] = []
        if a.resume:
            prior, result["earlier_runs"], kept = resume_rows(a, result["env"])
            result.update(kept)  # e.g. the earlier run's ppl, unless this run measures it again

        def save(rows: list[dict]) -> None:
            result["speed"] = rows
            write_json(a.out, result)

        result["speed"] = speed(a, device, save, prior)
        result["baselines"] = compare(result["speed"])
        write_json(a.out, result)
        print(table(result["speed"]))
    if a.ppl_transforms is not None:
        result["ppl"] = ppl(a, device)
        write_json(a.out, result)
        print(json.dumps(result["ppl"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
