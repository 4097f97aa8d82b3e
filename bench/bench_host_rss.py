"""Peak host memory while calibrating a full-depth model read lazily from a sharded bf16 safetensors folder.

    python bench/bench_host_rss.py --shape llama3-8b --folder /tmp/llama3-8b-random --device cuda

Writes a random model of the shape (all layers, real vocabulary) as a sharded bf16 HF folder once (16 GB for
LLaMA-3-8B; reused when present), then, in a fresh process, reads it with ``flatquant.models.hf.lazy_weights``
(top in fp32, as ``flatquant calibrate`` loads it) and calibrates every layer at tiny settings (the per-layer
work is not what is measured). Reports the peak resident set (``VmHWM``) against the issue's budget:
embeddings + LM head + 3 layers in fp32, above the process's own baseline (imports and, on CUDA, the CUDA
context: its ``VmRSS`` just before the weights are read). Writes ``bench/results/host_rss_<shape><tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer_parallel import SHAPES  # noqa: E402
from env import environment  # noqa: E402

from flatquant.models.args import ModelArgs  # noqa: E402


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key + ":")) * 1024


def write_folder(args: ModelArgs, folder: Path, shard_bytes: int = 2_000_000_000) -> None:
    """A random Llama of ``args`` as a sharded bf16 safetensors folder with an index (one layer at a time)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.rms_eps,
                      tie_word_embeddings=False, max_position_embeddings=4096)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    n = 0

    def flush() -> None:
        nonlocal shard, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, n = {}, n + 1

    def add(key: str, t: torch.Tensor) -> None:
        if sum(v.numel() * 2 for v in shard.values()) + t.numel() * 2 > shard_bytes:
            flush()
        shard[key] = t

    add("model.embed_tokens.weight", rnd(args.vocab_size, args.hidden, std=1.0))
    add("lm_head.weight", rnd(args.vocab_size, args.hidden))
    add("model.norm.weight", torch.ones(args.hidden, dtype=torch.bfloat16))
    hf_names = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    for i in tqdm(range(args.n_layers), desc="writing layers"):
        pre = f"model.layers.{i}."
        add(pre + "input_layernorm.weight", torch.ones(args.hidden, dtype=torch.bfloat16))
        add(pre + "post_attention_layernorm.weight", torch.ones(args.hidden, dtype=torch.bfloat16))
        for name, (o, k) in args.linear_shapes.items():
            add(f"{pre}{hf_names[name]}.{name}.weight", rnd(o, k))
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)


def measure(folder: Path, device: str, nsamples: int, seqlen: int, epochs: int, preset: str) -> dict:
    """Calibrate from the lazy folder in this process; peak host memory and its budget."""
    from transformers import AutoConfig

    from flatquant.calib.config import CalibConfig
    from flatquant.calib.loop import calibrate
    from flatquant.calib.methods import method_config
    from flatquant.models import hf
    from flatquant.presets import bits_preset

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # the CUDA context belongs to the baseline
    base = _status("VmRSS")
    cfg = AutoConfig.from_pretrained(folder)
    args = hf.args_from_config(cfg)
    w = hf.lazy_weights(folder, cfg, args).to(dtype=torch.float32)
    toks = torch.randint(0, args.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    calibrate(w, toks, bits_preset(preset), method_config("flatquant"),
              CalibConfig(nsamples=nsamples, seqlen=seqlen, batch_size=1, epochs=epochs, compile="off"), device=dev)
    layer_params = sum(o * k for o, k in args.linear_shapes.values()) + 2 * args.hidden
    budget = (2 * args.vocab_size * args.hidden + 3 * layer_params) * 4
    peak = _status("VmHWM")
    return {"peak_rss_gib": peak / 2**30, "baseline_rss_gib": base / 2**30,
            "peak_above_baseline_gib": (peak - base) / 2**30, "budget_gib": budget / 2**30,
            "within_budget": peak - base <= budget, "calibrate_s": time.time() - t0, "layers": args.n_layers,
            "model_bf16_gib": (2 * args.vocab_size * args.hidden + args.n_layers * layer_params) * 2 / 2**30}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's full depth")
    ap.add_argument("--folder", type=Path, required=True, help="where the random model is (or is written)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--preset", default="w4a4kv4", help="on CPU, w16a16kv4 keeps the eager step's memory small")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # a fresh process: its VmHWM holds nothing from writing the folder
        print(json.dumps(measure(a.folder, a.device, a.nsamples, a.seqlen, a.epochs, a.preset)))
        return 0
    args = ModelArgs(**{**SHAPES[a.shape].to_dict(), **({"n_layers": a.layers} if a.layers else {})})
    if not (a.folder / "config.json").is_file():
        write_folder(args, a.folder)
    r = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return r.returncode
    res = {**json.loads(r.stdout.strip().splitlines()[-1]), "shape": a.shape, "device": a.device,
           "settings": {"nsamples": a.nsamples, "seqlen": a.seqlen, "epochs": a.epochs, "preset": a.preset},
           "command": " ".join(sys.argv), "env": environment()}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"host_rss_{a.shape}{a.tag}.json").write_text(json.dumps(res, indent=1))
    print(f"{a.shape}, {res['layers']} layers ({res['model_bf16_gib']:.1f} GiB in bf16): peak host RSS "
          f"{res['peak_rss_gib']:.2f} GiB = baseline {res['baseline_rss_gib']:.2f} + "
          f"{res['peak_above_baseline_gib']:.2f} GiB; budget (embeddings + LM head + 3 layers in fp32) "
          f"{res['budget_gib']:.2f} GiB: {'within' if res['within_budget'] else 'OVER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
