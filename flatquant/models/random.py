"""Random-weight models built from a config (tests and speed benchmarks, as the paper's benchmarks do)."""

from __future__ import annotations

import torch

from .args import ModelArgs, layer_tensors
from .model import ModelWeights

LLAMA3_8B = ModelArgs(vocab_size=128256, hidden=4096, intermediate=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, rms_eps=1e-5)
LLAMA2_7B = ModelArgs(vocab_size=32000, hidden=4096, intermediate=11008, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, rms_eps=1e-5)


def _near_one(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``1 + 0.3 N(0, 1)`` (fp32): a family's extra layer tensors (:data:`~flatquant.models.args.LAYER_TENSORS`,
    norm weights) in random models."""
    return 1 + 0.3 * torch.randn(shape, generator=generator)


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
        for e in layer_tensors(args):
            p[e.name] = _near_one(e.shape(args), generator).to(dtype)
        layers.append(p)
    embed = (torch.randn(args.vocab_size, args.hidden, generator=generator)).to(dtype)
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    top = {"embed": embed, "final_norm": norm(), "lm_head": embed if args.tie_embeddings else w(args.vocab_size,
                                                                                                args.hidden),
           "rope.inv_freq": inv_freq}
    return ModelWeights(args=args, top=top, layers=tuple(layers))


def random_real_tensors(args: ModelArgs, *, generator: torch.Generator, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor],
                                                                         list[dict[str, torch.Tensor]]]:
    """Top-level and per-layer tensors of a real checkpoint (:mod:`flatquant.models.real`'s schema) with random
    packed int4 weights, random orthogonal online transforms and distinct LAC factors per linear.

    Drawn on the CPU from ``generator`` (reproducible on any device), then moved to ``device``; nothing in fp32 of
    the weights' size is kept, so LLaMA-3-8B shapes fit for speed benchmarks.
    """
    from ..core.kron import decompose_dim
    from .flat import site_dim
    from .sites import KRON_SITES

    def orth(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, n, generator=generator))[0].to(device)

    def clip() -> torch.Tensor:
        return (0.8 + 0.2 * torch.rand(2, generator=generator)).to(device)

    layers = []
    for _ in range(args.n_layers):
        t = {"input_norm": (1 + 0.1 * torch.randn(args.hidden, generator=generator)).to(device, dtype),
             "post_norm": (1 + 0.1 * torch.randn(args.hidden, generator=generator)).to(device, dtype)}
        for n, (o, k) in args.linear_shapes.items():
            t[f"{n}.qweight"] = torch.randint(0, 256, (o, k // 2), generator=generator, dtype=torch.uint8).to(device)
            t[f"{n}.w_scale"] = (0.02 / 4.6 * (0.5 + torch.rand(o, generator=generator))).to(device)
            t[f"{n}.a_clip"] = clip()
        if args.qkv_bias:
            for n in ("q_proj", "k_proj", "v_proj"):
                t[f"{n}.bias"] = torch.randn(args.linear_shapes[n][0], generator=generator).to(device, dtype)
        for e in layer_tensors(args):
            t[e.name] = _near_one(e.shape(args), generator).to(device, dtype)
        for site in KRON_SITES:
            n1, n2 = decompose_dim(site_dim(site, args))
            t[f"{site}.left"], t[f"{site}.right"] = orth(n1), orth(n2)
        t["o_trans"] = orth(args.n_heads)
        t["k_trans"] = orth(args.head_dim)
        t["k_trans_inv_t"] = t["k_trans"]  # orthogonal: its inverse-transpose is itself
        t["k_cache.clip"], t["v_cache.clip"] = clip(), clip()
        layers.append(t)
    inv = 1.0 / 500000.0 ** (torch.arange(0, args.head_dim, 2, dtype=torch.float32) / args.head_dim)
    top = {"embed": torch.randn(args.vocab_size, args.hidden, generator=generator).to(device, dtype),
           "final_norm": torch.ones(args.hidden, dtype=dtype, device=device),
           "lm_head": (torch.randn(args.vocab_size, args.hidden, generator=generator) * 0.02).to(device, dtype),
           "rope.inv_freq": inv.to(device)}
    return top, layers
