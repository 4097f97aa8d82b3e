"""End-to-end benchmark of the real W4A4KV4 model against bf16, and real-path vs fake-path perplexity.

Speed (random weights, as the paper's benchmarks): a LLaMA-3-8B-shaped model, prefill ``--prefill`` tokens
(default 2048) then ``--decode`` greedy steps (default 256) at each batch size of ``--batches`` (default 1,4,16):

* ``real-w4a4kv4``: :class:`flatquant.models.real.RealModel` built directly from random packed int4 weights, random
  orthogonal online transforms and a packed KV4 cache (no fp32 weights are ever materialised);
* ``real-w4a4kv4-eager``: the same without CUDA-graph replay of the decode steps (per-op launches);
* ``ours-bf16``: the same engine with bf16 linears and a bf16 KV cache (fake path with quantization off);
* ``hf-bf16-sdpa``: ``transformers`` ``LlamaForCausalLM`` in bf16 with ``attn_implementation="sdpa"`` and its
  default dynamic cache.

Each row reports prefill latency (median of ``--repeats``), decode time and tokens/s, peak allocated memory during
prefill + decode, and the KV-cache bytes at the end; speedups are against ``hf-bf16-sdpa``. Models are built
one after the other and freed, so peaks do not overlap.

Accuracy (``--ppl-transforms DIR``, e.g. ``bench/results/transforms_smollm2_w4a4kv4_4ep``): exports the
checkpoint to a temporary folder and compares the real-path PPL (Triton ops on CUDA, reference ops on CPU) with
the fake-path PPL on the first ``--ppl-windows`` windows of the held-out corpus.

Usage (H100): ``PYTHONPATH=. python bench/bench_e2e.py --out bench/results/e2e_h100.json``;
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.core.kron import decompose_dim  # noqa: E402
from flatquant.core.spec import QuantConfig  # noqa: E402
from flatquant.models.args import LINEARS, ModelArgs  # noqa: E402
from flatquant.models.flat import KRON_SITES, site_dim  # noqa: E402
from flatquant.models.random import LLAMA3_8B  # noqa: E402
from flatquant.models.real import (  # noqa: E402
    CUDAGraphDecoder,
    RealConfig,
    RealModel,
    RealWeights,
    layer_from_tensors,
)
from flatquant.presets import bits_preset  # noqa: E402

log = logging.getLogger("bench_e2e")
TINY = ModelArgs(vocab_size=512, hidden=128, intermediate=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32)


def _orth(n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g))[0].to(device)


def random_real_model(args: ModelArgs, qcfg: QuantConfig, device: torch.device, *, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> RealModel:
    """A real model with random packed weights and random orthogonal online transforms (checkpoint schema)."""
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    cfg = RealConfig(args=args, qcfg=qcfg, dtype=dtype, real_linears=True)
    layers = []
    for _ in range(args.n_layers):
        t: dict[str, torch.Tensor] = {"input_norm": torch.ones(args.hidden, dtype=dtype, device=device),
                                      "post_norm": torch.ones(args.hidden, dtype=dtype, device=device)}
        for n, (o, k) in args.linear_shapes.items():
            t[f"{n}.qweight"] = torch.randint(0, 256, (o, k // 2), generator=gd, device=device, dtype=torch.uint8)
            t[f"{n}.w_scale"] = torch.full((o,), 0.02 / 4.6, device=device)
            t[f"{n}.a_clip"] = torch.full((2,), 0.9, device=device)
        for site in KRON_SITES:
            n1, n2 = decompose_dim(site_dim(site, args))
            t[f"{site}.left"], t[f"{site}.right"] = _orth(n1, g, device), _orth(n2, g, device)
        t["o_trans"] = _orth(args.n_heads, g, device)
        t["k_trans"] = t["k_trans_inv_t"] = _orth(args.head_dim, g, device)
        for n in ("k_cache", "v_cache"):
            t[f"{n}.clip"] = torch.full((2,), 0.95, device=device)
        layers.append(layer_from_tensors(t, cfg))
    return RealModel(RealWeights(cfg=cfg, top=_top(args, gd, device, dtype), layers=tuple(layers)))


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


class OursRunner:
    """Prefill/decode of a :class:`RealModel`; ``graph`` replays each decode step from a CUDA graph."""

    def __init__(self, model: RealModel, graph: bool = False) -> None:
        self.model, self.graph = model, graph
        self.decoder: CUDAGraphDecoder | None = None

    def prefill(self, tokens: torch.Tensor, max_len: int) -> tuple[torch.Tensor, object]:
        cache = self.model.new_cache(tokens.shape[0], max_len)
        return self.model.forward(tokens, cache, last_only=True)[:, -1], cache

    def step(self, nxt: torch.Tensor, cache: object) -> torch.Tensor:
        if not self.graph:
            return self.model.forward(nxt[:, None], cache)[:, -1]
        if self.decoder is None or self.decoder.cache is not cache:
            self.decoder = None
            self.decoder = CUDAGraphDecoder(self.model, cache)
        return self.decoder.step(nxt)

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
        total = 0
        for layer in getattr(cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


def hf_model(args: ModelArgs, device: torch.device) -> torch.nn.Module:
    """Random-weight ``LlamaForCausalLM`` in bf16 with SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.rms_eps,
                      max_position_embeddings=8192, rope_theta=500000.0, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


@torch.no_grad()
def measure(runner, args: ModelArgs, device: torch.device, batch: int, prefill: int, decode: int,
            repeats: int) -> dict:
    """Prefill latency (median), decode time, tokens/s, peak memory and KV-cache bytes at one batch size."""
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, args.vocab_size, (batch, prefill), generator=g).to(device)
    max_len = prefill + decode
    runner.prefill(tokens[:, : min(prefill, 16)], 32)  # warm-up: kernel compilation / autotuning
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


def speed(a: argparse.Namespace, device: torch.device) -> list[dict]:
    """All engines × batch sizes."""
    args = TINY if a.tiny else LLAMA3_8B
    if a.layers:
        args = ModelArgs(**{**args.to_dict(), "n_layers": a.layers})
    graph = device.type == "cuda"
    engines = {
        "real-w4a4kv4": lambda: OursRunner(random_real_model(args, bits_preset("w4a4kv4"), device), graph),
        "real-w4a4kv4-eager": lambda: OursRunner(random_real_model(args, bits_preset("w4a4kv4"), device)),
        "ours-bf16": lambda: OursRunner(random_bf16_engine(args, device), graph),
        "hf-bf16-sdpa": lambda: HFRunner(hf_model(args, device)),
    }
    rows = []
    for name in a.engines.split(","):
        log.info("building %s", name)
        try:
            runner = engines[name]()
        except Exception as e:  # keep going: one engine failing must not lose the others
            log.error("%s: build failed: %s", name, e)
            rows.append({"engine": name, "error": traceback.format_exc(limit=3)})
            continue
        for b in [int(x) for x in a.batches.split(",")]:
            try:
                r = {"engine": name, **measure(runner, args, device, b, a.prefill, a.decode, a.repeats)}
            except Exception as e:
                log.error("%s batch %d failed: %s", name, b, e)
                r = {"engine": name, "batch": b, "error": traceback.format_exc(limit=3)}
            rows.append(r)
            log.info("%s", r)
        del runner
        _peak_reset(device)
    base = {r["batch"]: r for r in rows if r["engine"] == "hf-bf16-sdpa" and "error" not in r}
    for r in rows:
        if "error" not in r and r["batch"] in base:
            b = base[r["batch"]]
            r["prefill_speedup"] = b["prefill_ms"] / r["prefill_ms"]
            r["decode_speedup"] = r["decode_tok_s"] / b["decode_tok_s"]
            r["kv_ratio"] = r["kv_cache_bytes"] / max(b["kv_cache_bytes"], 1)
    return rows


def ppl(a: argparse.Namespace, device: torch.device) -> dict:
    """Real-path vs fake-path perplexity of an exported checkpoint on the first windows of the corpus."""
    from flatquant.api import from_transforms
    from flatquant.data import eval_windows, tokenize_corpus
    from flatquant.evaluate import window_nlls as fake_nlls
    from flatquant.export import export_checkpoint, load_checkpoint
    from flatquant.io import load_transforms
    from flatquant.models.hf import load
    from flatquant.models.real import window_nlls

    weights, tok = load(a.ppl_model)
    flats, qcfg, tcfg, meta = load_transforms(a.ppl_transforms, weights.args)
    fake = from_transforms(weights, flats, qcfg, tcfg, meta["method"]).weights
    windows = eval_windows(tokenize_corpus("wiki-offline", "test", tok, bos_token_id=weights.args.bos_token_id),
                           2048, a.ppl_windows)
    out: dict = {"windows": int(windows.shape[0]), "transforms": str(a.ppl_transforms), "bits": qcfg.tag}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(weights, flats, qcfg, tcfg, Path(tmp) / "ck")
        for dt in dtypes:
            name = str(dt).removeprefix("torch.")
            t0 = time.time()
            out[f"fake_{name}"] = math.exp(fake_nlls(fake.to(dtype=dt), windows, qcfg, device=device).mean().item())
            out[f"fake_{name}_s"] = time.time() - t0
            try:
                real = load_checkpoint(Path(tmp) / "ck", device, dtype=dt)
                t0 = time.time()
                out[f"real_{name}"] = math.exp(window_nlls(real, windows).mean().item())
                out[f"real_{name}_s"] = time.time() - t0
                out[f"real_vs_fake_{name}_pct"] = 100 * (out[f"real_{name}"] / out[f"fake_{name}"] - 1)
                del real
            except Exception:
                out[f"real_{name}_error"] = traceback.format_exc(limit=3)
            log.info("%s", out)
    return out


def table(rows: list[dict]) -> str:
    """Markdown table of the speed rows."""
    head = ("| engine | batch | prefill ms | prefill tok/s | decode ms/step | decode tok/s | peak GB | KV MB | "
            "prefill × | decode × | KV × |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r.get('batch', '-')} | error: {r['error'].splitlines()[-1][:60]} |")
            continue
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prefill_ms']:.1f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['decode_tok_s']:.1f} | {r['peak_mem_gb']:.2f} | "
                     f"{r['kv_cache_bytes'] / 1e6:.1f} | {r.get('prefill_speedup', float('nan')):.2f} | "
                     f"{r.get('decode_speedup', float('nan')):.2f} | {r.get('kv_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of LLaMA-3-8B (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--engines", default="real-w4a4kv4,real-w4a4kv4-eager,ours-bf16,hf-bf16-sdpa",
                    help="comma-separated engines (real-w4a4kv4 and ours-bf16 replay decode steps from a CUDA graph "
                         "on CUDA; real-w4a4kv4-eager does not)")
    ap.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes (default 1,4,16)")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens (default 2048)")
    ap.add_argument("--decode", type=int, default=256, help="decode steps (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills per row (median; default 3)")
    ap.add_argument("--skip-speed", action="store_true", help="only the perplexity comparison")
    ap.add_argument("--ppl-transforms", type=Path, default=None, help="transforms folder for real-vs-fake PPL")
    ap.add_argument("--ppl-model", default="smollm2-135m", help="model of --ppl-transforms (default smollm2-135m)")
    ap.add_argument("--ppl-windows", type=int, default=20, help="corpus windows of 2048 (default 20)")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device(a.device)
    result: dict = {"env": environment(), "args": {k: str(v) for k, v in vars(a).items()}}
    if not a.skip_speed:
        result["speed"] = speed(a, device)
        print(table(result["speed"]))
    if a.ppl_transforms is not None:
        result["ppl"] = ppl(a, device)
        print(json.dumps(result["ppl"], indent=1))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
