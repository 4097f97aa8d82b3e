"""A real-data Qwen2-family checkpoint: SmolLM2-135M-Instruct's weights in a ``Qwen2ForCausalLM`` with q/k/v biases.

There is no Qwen2 checkpoint on the CPU machine; this writes an HF folder (``config.json`` with ``model_type``
``qwen2``, fp32 safetensors, the tokenizer) that every flatquant command takes as ``--model FOLDER``, so Qwen2's
bias paths (calibration, folding, export, the real engine) run on trained weights and real text.

The biases (drawn with ``--seed``; ``std`` is each output channel's standard deviation over one 2048-token
calibration window of the bias-free model):

* ``k_proj``: ``--k-scale · std · sign`` on the ``--k-pairs`` lowest-frequency RoPE pairs of every KV head (dims
  ``d/2 - p .. d/2 - 1`` and ``d - p .. d - 1`` in HF's rotate-half layout), 0 elsewhere. A constant k bias shifts
  the logits of one query by ``q · R(n - m) b``; without RoPE that is the same for every key and softmax ignores it,
  but RoPE rotates ``b`` with the distance, so only pairs whose angle stays small over the window (``θ · 2048`` ≈
  0.03-0.06 rad here, ``rope_theta`` 1e5) keep the model nearly unchanged. Large k biases of this kind are what
  trained Qwen2 models have, and they make the K cache harder to quantize.
* ``q_proj``: ``--q-scale · std · N(0, 1)``, ``v_proj``: ``--v-scale · std · N(0, 1)`` on every channel: small
  perturbations of the function. A v bias reaches the residual stream of every position as ``W_o b_v`` (softmax
  weights sum to 1), so it moves the model most: on one 512-token test window a 0.1-std v bias alone raised the FP
  PPL by 10%, a 0.1-std q bias by 0.9%, the k bias above by 0.06%.

The FP perplexity of the result against the original is measured with ``flatquant eval --method fp``.

    PYTHONPATH=. python bench/qwen2_smollm2.py --out runs/smollm2-135m-qwen2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from env import environment  # noqa: E402

from flatquant.data import calibration_windows, tokenize_corpus  # noqa: E402
from flatquant.models.hf import hf_layer_names, load  # noqa: E402
from flatquant.models.model import ModelWeights  # noqa: E402

log = logging.getLogger("qwen2_smollm2")
QKV = ("q_proj", "k_proj", "v_proj")


def qwen2_config(w: ModelWeights, rope_theta: float):  # -> transformers.Qwen2Config
    """The ``Qwen2Config`` of the same shapes as ``w`` (no sliding window, tied embeddings as ``w``)."""
    from transformers import Qwen2Config

    a = w.args
    return Qwen2Config(vocab_size=a.vocab_size, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                       head_dim=a.head_dim, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=a.rms_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                       tie_word_embeddings=a.tie_embeddings, use_sliding_window=False, bos_token_id=a.bos_token_id,
                       eos_token_id=2, pad_token_id=2, dtype="float32")


def hf_state_dict(w: ModelWeights) -> dict[str, torch.Tensor]:
    """``w`` under transformers' ``Qwen2ForCausalLM`` names (biases included when the layer dicts have them)."""
    sd = {"model.embed_tokens.weight": w.top["embed"], "model.norm.weight": w.top["final_norm"]}
    if not w.args.tie_embeddings:
        sd["lm_head.weight"] = w.top["lm_head"]
    names = hf_layer_names(w.args)
    for i in range(w.args.n_layers):
        p = w.layers[i]
        sd.update({f"model.layers.{i}.{theirs}": p[ours] for theirs, ours in names.items() if ours in p})
    return sd


def channel_std(model: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Per-output-channel std of every layer's q/k/v projection over ``ids`` (1, T)."""
    out: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for n in QKV:
            def hook(_m, _inp, y, key=(i, n)) -> None:
                out[key] = y.detach().reshape(-1, y.shape[-1]).std(0)
            hooks.append(getattr(layer.self_attn, n).register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return out


def biases(std: dict[tuple[int, str], torch.Tensor], head_dim: int, k_pairs: int, k_scale: float, q_scale: float,
           v_scale: float, seed: int) -> dict[tuple[int, str], torch.Tensor]:
    """The q/k/v biases of the module docstring for channel stds ``std``."""
    g = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    low = torch.zeros(head_dim, dtype=torch.bool)
    low[half - k_pairs:half] = True
    low[head_dim - k_pairs:] = True
    out = {}
    for (i, n), s in sorted(std.items()):
        if n == "k_proj":
            mask = low.repeat(s.numel() // head_dim)
            sign = torch.randint(0, 2, s.shape, generator=g).float() * 2 - 1
            out[(i, n)] = torch.where(mask, k_scale * s * sign, torch.zeros_like(s))
        else:
            out[(i, n)] = (q_scale if n == "q_proj" else v_scale) * s * torch.randn(s.shape, generator=g)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="source Llama-family model (default smollm2-135m)")
    ap.add_argument("--out", type=Path, required=True, help="HF folder to write")
    ap.add_argument("--k-pairs", type=int, default=3, help="lowest-frequency RoPE pairs with a k bias (default 3)")
    ap.add_argument("--k-scale", type=float, default=4.0, help="k bias in channel stds (default 4)")
    ap.add_argument("--q-scale", type=float, default=0.1, help="q bias std in channel stds (default 0.1)")
    ap.add_argument("--v-scale", type=float, default=0.03, help="v bias std in channel stds (default 0.03)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from transformers import Qwen2ForCausalLM

    w, tok = load(a.model)
    base = w.top["rope.inv_freq"][1].double() ** (-w.args.head_dim / 2)  # inv_freq[i] = base^(-2i/d)
    rope_theta = float(round(base.item()))
    inv = 1.0 / rope_theta ** (torch.arange(0, w.args.head_dim, 2).double() / w.args.head_dim)
    if not torch.allclose(inv.float(), w.top["rope.inv_freq"].float(), rtol=1e-6):
        raise SystemExit(f"{a.model}: RoPE is not the default one of theta {rope_theta}; cannot convert")
    cfg = qwen2_config(w, rope_theta)
    model = Qwen2ForCausalLM(cfg).eval()
    sd = hf_state_dict(w)
    for i in range(w.args.n_layers):  # bias-free first: the statistics are the original model's
        for n in QKV:
            sd[f"model.layers.{i}.self_attn.{n}.bias"] = torch.zeros(w.args.linear_shapes[n][0])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    ids = calibration_windows(tokenize_corpus("wiki-offline", "train", tok, bos_token_id=w.args.bos_token_id),
                              1, 2048, seed=a.seed)
    b = biases(channel_std(model, ids), w.args.head_dim, a.k_pairs, a.k_scale, a.q_scale, a.v_scale,
               a.seed)
    with torch.no_grad():
        for (i, n), t in b.items():
            getattr(model.model.layers[i].self_attn, n).bias.copy_(t)
    a.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(a.out))
    tok.save_pretrained(str(a.out))
    recipe = {"source": a.model, "k_pairs": a.k_pairs, "k_scale": a.k_scale, "q_scale": a.q_scale,
              "v_scale": a.v_scale, "seed": a.seed,
              "rope_theta": rope_theta,
              "bias_abs_max": {n: max(float(t.abs().max()) for (_, m), t in b.items() if m == n) for n in QKV},
              "env": environment()}
    (a.out / "flatquant_source.json").write_text(json.dumps(recipe, indent=1))
    log.info("wrote %s: %s", a.out, {k: v for k, v in recipe.items() if k != "env"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
