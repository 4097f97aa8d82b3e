"""Tiny model builders shared by tests."""

from __future__ import annotations

import torch

from flatquant.models.args import ModelArgs
from flatquant.models.random import random_weights

TINY = ModelArgs(vocab_size=128, hidden=48, intermediate=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12)
TINY_QWEN = ModelArgs(arch="qwen2", vocab_size=128, hidden=40, intermediate=72, n_layers=2, n_heads=5, n_kv_heads=1,
                      head_dim=8, qkv_bias=True)


def tiny_model(args: ModelArgs = TINY, seed: int = 0, outliers: int = 2):
    """Random weights with a few outlier channels."""
    return random_weights(args, generator=torch.Generator().manual_seed(seed), outlier_channels=outliers)


def tokens(n: int, t: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    """Random token windows (n, t)."""
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
