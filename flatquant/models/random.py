"""Random-weight models built from a config (tests and speed benchmarks, as the paper's benchmarks do)."""

from __future__ import annotations

import torch

from .args import ModelArgs
from .model import ModelWeights

LLAMA3_8B = ModelArgs(vocab_size=128256, hidden=4096, intermediate=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, rms_eps=1e-5)
LLAMA2_7B = ModelArgs(vocab_size=32000, hidden=4096, intermediate=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, rms_eps=1e-5)


def random_weights(args: ModelArgs, *, generator: torch.Generator, dtype: torch.dtype = torch.float32,
                   outlier_channels: int = 0, rope_theta: float = 10000.0) -> ModelWeights:
    """A model with Gaussian weights (std 0.02) and norms near 1.

    ``outlier_channels`` hidden channels get 20× larger norm weights, to mimic LLM activation outliers.
    """
    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(dtype)

    def norm() -> torch.Tensor:
        n = 1 + 0.1 * torch.randn(args.hidden, generator=generator)
        if outlier_channels:
            idx = torch.randperm(args.hidden, generator=generator)[:outlier_channels]
            n[idx] *= 20
        return n.to(dtype)

    layers = []
    for _ in range(args.n_layers):
        p = {"input_norm": norm(), "post_norm": norm()}
        for name, (o, i) in args.linear_shapes.items():
            p[f"{name}.weight"] = w(o, i)
        if args.qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                p[f"{name}.bias"] = w(args.linear_shapes[name][0])
        layers.append(p)
    embed = (torch.randn(args.vocab_size, args.hidden, generator=generator)).to(dtype)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    top = {"embed": embed, "final_norm": norm(), "lm_head": embed if args.tie_embeddings else w(args.vocab_size,
                                                                                                args.hidden),
           "rope.inv_freq": inv_freq}
    return ModelWeights(args=args, top=top, layers=tuple(layers))
