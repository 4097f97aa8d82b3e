"""Per-layer real vs fake with identical inputs: where the real engine departs from the fake model, and why.

Exports the checkpoint of ``--transforms`` to a temporary folder and loads it on CPU in fp32 (reference ops). Along
the fake model's own trajectory over one corpus window, every decoder layer gets the *same* input ``x`` on both
paths: the fake ``layer_forward`` and the real engine's ``layer_step`` (prefill into a fresh KV4 cache). Per layer:

* ``rel``: ``‖y_real − y_fake‖ / ‖y_fake − x‖`` (relative to the layer's update of the residual stream);
* ``tok_frac``: share of tokens whose update differs by more than 1e-4 relative (a systematic error, e.g. a
  misplaced bias, touches every token; 4-bit codes at rounding ties touch a few);
* per linear, the 4-bit activation codes the two paths chose for that linear's input (the fake's quantizer on its
  transformed input, the real engine's ``kron_quant`` codes): ``flips`` (codes that differ), ``max_step`` (largest
  difference, 1 for rounding ties) and ``n``. q/k/v see identical inputs; later linears see inputs that already
  carry the attention's differences.
* ``kv_flips``: K and V cache entries (after RoPE and the K transform, 4-bit asymmetric per token and KV head)
  whose dequantized values on the two paths differ by more than half a quantization step (the real engine's
  packed cache against the fake quantizer on the fake path's own k/v projections).

    PYTHONPATH=. python bench/probe_real_fake.py --model runs/smollm2-135m-qwen2 \\
        --transforms runs/cal_qwen2_16x512_1ep --tokens 2048 --out bench/results/probe/real_fake_qwen2.json
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment, write_json  # noqa: E402

import flatquant.models.layer as layer_mod  # noqa: E402
import flatquant.models.real.linear as real_linear_mod  # noqa: E402
from flatquant.api import from_transforms  # noqa: E402
from flatquant.core.clip import clip_factor  # noqa: E402
from flatquant.core.quant import quantize  # noqa: E402
from flatquant.core.spec import QuantSpec  # noqa: E402
from flatquant.data import eval_windows, tokenize_corpus  # noqa: E402
from flatquant.io import load_transforms  # noqa: E402
from flatquant.models.hf import load  # noqa: E402
from flatquant.models.layer import Params, layer_forward, linear  # noqa: E402
from flatquant.models.model import embed, rope_for  # noqa: E402
from flatquant.models.real.cache import read_kv  # noqa: E402
from flatquant.models.real.checkpoint import export_checkpoint, load_checkpoint  # noqa: E402
from flatquant.models.real.step import layer_step, rope_at  # noqa: E402
from flatquant.models.sites import FUSED_GROUPS  # noqa: E402

log = logging.getLogger("probe_real_fake")


class RealCodes:
    """Records the activation codes of the real engine's ``kron_quant`` / ``kron_quant_multi`` calls, in order."""

    def __init__(self) -> None:
        self.calls: list[Tensor] = []  # (G, M, K) int8 codes (G = 1 for kron_quant)

    def wrap(self, fn: Callable[..., tuple[Tensor, Tensor]], multi: bool) -> Callable[..., tuple[Tensor, Tensor]]:
        def recorded(*a: object, **kw: object) -> tuple[Tensor, Tensor]:
            codes, scale = fn(*a, **kw)
            pack = bool(a[6]) if len(a) > 6 else bool(kw.get("pack", False))
            if not pack:  # the CPU engine (cpu_codes) takes unpacked int8 codes
                self.calls.append(codes if multi else codes[None])
            return codes, scale
        return recorded


def real_site_codes(calls: list[Tensor]) -> dict[str, Tensor]:
    """Linear name -> (M, K) codes of one layer's calls: q/k/v (one call), o, gate/up (one call), down."""
    qkv, up_gate = FUSED_GROUPS["qkv"], FUSED_GROUPS["up_gate"]
    if len(calls) != 4:
        raise RuntimeError(f"expected 4 transform+quantize calls per layer, got {len(calls)} (unfused engine?)")
    out = {n: calls[0][i] for i, n in enumerate(qkv)}
    out["o_proj"] = calls[1][0]
    out.update({n: calls[2][i] for i, n in enumerate(up_gate)})
    out["down_proj"] = calls[3][0]
    return out


def quantizer_codes(p: Params, prefix: str, x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scale and zero point of the fake quantizer ``prefix`` (a linear's input, ``k_cache``, ``v_cache``) on
    ``x``, its clip logits read as :func:`flatquant.models.layer.quant_act` reads them."""
    lo, hi = (clip_factor(p.get(f"{prefix}.lac.{e}")) for e in ("lo", "hi"))
    return quantize(x, spec, clip_lo=lo, clip_hi=hi)


def probe(model: str, transforms: Path, window: int, tokens: int) -> dict:
    """The per-layer figures of the module docstring for one window."""
    weights, tok = load(model)
    flats, qcfg, tcfg, meta = load_transforms(transforms, weights.args)
    fake = from_transforms(weights, flats, qcfg, tcfg, meta["method"]).weights
    ids = eval_windows(tokenize_corpus("wiki-offline", "test", tok, bos_token_id=weights.args.bos_token_id),
                       tokens, window + 1)[window:window + 1]
    args = fake.args
    rec = RealCodes()
    orig = real_linear_mod.kron_quant, real_linear_mod.kron_quant_multi
    real_linear_mod.kron_quant = rec.wrap(orig[0], multi=False)  # type: ignore[assignment]
    real_linear_mod.kron_quant_multi = rec.wrap(orig[1], multi=True)  # type: ignore[assignment]
    fake_codes: dict[str, Tensor] = {}
    fake_kv: dict[str, tuple[Tensor, Tensor]] = {}
    orig_quant_act = layer_mod.quant_act

    def recording_quant_act(p: Params, prefix: str, x: Tensor, spec: QuantSpec, **kw: object) -> Tensor:
        if prefix in ("k_cache", "v_cache"):  # what attention hands its KV quantizers (after RoPE, K transform)
            codes, scale, zero = quantizer_codes(p, prefix, x, spec)
            fake_kv[prefix[0]] = ((codes.float() - zero) * scale, scale)  # dequantized values, step
        return orig_quant_act(p, prefix, x, spec, **kw)

    def recording_linear(p: Params, name: str, x: Tensor, spec: QuantSpec) -> Tensor:
        fake_codes[name] = quantizer_codes(p, name, x, spec)[0].reshape(-1, x.shape[-1])
        return linear(p, name, x, spec)

    layers = []
    layer_mod.quant_act = recording_quant_act  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            export_checkpoint(weights, flats, qcfg, tcfg, Path(tmp) / "ck")
            real = load_checkpoint(Path(tmp) / "ck", torch.device("cpu"), dtype=torch.float32)
            x = embed(fake, ids).float()
            t = ids.shape[1]
            rope = rope_for(fake, t, x.device)
            idx = torch.arange(t)
            rope_r = rope_at(real.weights.top["rope.inv_freq"], idx[None], real.cfg.rope_scaling)
            cache = real.new_cache(1, t)
            length = torch.full((1,), t, dtype=torch.int32)
            for i in range(args.n_layers):
                rec.calls.clear()
                fake_codes.clear()
                fake_kv.clear()
                y_f = layer_forward(fake.layers[i], x, rope, args, qcfg, linear_fn=recording_linear)
                y_r = layer_step(real.weights.layers[i], x, rope_r, cache.layers[i], real.cfg, idx, cache.start,
                                 length, n_valid=t, decode=False, causal_from_zero=True, k_packed=cache.k_packed,
                                 v_packed=cache.v_packed)
                upd = (y_f - x)[0]
                err = (y_r - y_f)[0]
                tok_rel = err.norm(dim=-1) / upd.norm(dim=-1).clamp_min(1e-30)
                row: dict = {"layer": i, "rel": float(err.norm() / upd.norm()),
                             "tok_frac": float((tok_rel > 1e-4).float().mean()),
                             "tok_rel_max": float(tok_rel.max()), "linears": {}}
                for name, rc in real_site_codes(rec.calls).items():
                    d = (rc.float() - fake_codes[name]).abs()
                    row["linears"][name] = {"flips": int((d > 0).sum()), "max_step": float(d.max()),
                                            "n": int(d.numel())}
                if cache.k_packed and cache.v_packed:
                    kv = cache.layers[i]
                    real_kv = {"k": read_kv(kv.k, kv.k_scale, kv.k_zero, True, t, torch.float32),
                               "v": read_kv(kv.v, kv.v_scale, kv.v_zero, True, t, torch.float32)}
                    row["kv_flips"] = {n: int(((real_kv[n] - deq).abs() > 0.5 * step).sum())
                                       for n, (deq, step) in fake_kv.items()}
                    row["kv_n"] = int(real_kv["k"].numel())
                layers.append(row)
                log.info("layer %d: rel %.3g, tokens off %.4f, flips %s, KV %s", i, row["rel"], row["tok_frac"],
                         {n: v["flips"] for n, v in row["linears"].items()}, row.get("kv_flips"))
                x = y_f
    finally:
        real_linear_mod.kron_quant, real_linear_mod.kron_quant_multi = orig  # type: ignore[assignment]
        layer_mod.quant_act = orig_quant_act  # type: ignore[assignment]
    total = {n: sum(r["linears"][n]["flips"] for r in layers) for n in layers[0]["linears"]}
    total.update({f"{n}_cache": sum(r.get("kv_flips", {}).get(n, 0) for r in layers) for n in ("k", "v")})
    return {"model": model, "transforms": str(transforms), "window": window, "tokens": tokens, "bits": qcfg.tag,
            "flips_total": total, "codes_per_linear_layer": {n: v["n"] for n, v in layers[0]["linears"].items()},
            "layers": layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--transforms", type=Path, required=True)
    ap.add_argument("--window", type=int, default=0, help="test-corpus window index (default 0)")
    ap.add_argument("--tokens", type=int, default=2048, help="window length (default 2048)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = {"env": environment(), **probe(a.model, a.transforms, a.window, a.tokens)}
    write_json(a.out, result)
    log.info("flips per linear over all layers: %s", result["flips_total"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
