"""Whole-model weights and the functional causal-LM forward."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.norm import rms_norm
from ..core.spec import QuantConfig
from .args import ModelArgs
from .layer import Params, Rope, layer_forward, make_rope


@dataclass(frozen=True)
class ModelWeights:
    """A decoder-only LM as plain tensors.

    Attributes:
        args: shapes and constants.
        top: ``embed`` (vocab, hidden), ``final_norm`` (hidden,), ``lm_head`` (vocab, hidden),
            ``rope.inv_freq`` (head_dim/2,).
        layers: one parameter dict per decoder layer (see :mod:`flatquant.models.layer`): a tuple, or a
            :class:`flatquant.models.lazy.LazyLayers` that reads each layer from its files when indexed.
        rope_scaling: HF's ``attention_scaling`` factor on cos/sin.
    """

    args: ModelArgs
    top: Params
    layers: tuple[Params, ...]
    rope_scaling: float = 1.0
    meta: dict[str, str] = field(default_factory=dict)

    def with_layers(self, layers: list[Params] | tuple[Params, ...]) -> ModelWeights:
        """Same model with other layer dicts (e.g. folded and quantized ones)."""
        return replace(self, layers=tuple(layers))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelWeights:
        """Copy of the weights on another device / floating dtype (``rope.inv_freq`` stays fp32)."""

        def cast(k: str, t: Tensor) -> Tensor:
            keep = k == "rope.inv_freq" or not t.is_floating_point()
            return t.to(device=device, dtype=None if keep else dtype)

        lazy_to = getattr(self.layers, "to", None)
        if lazy_to is not None and (device is None or torch.device(device).type == "cpu"):
            layers = lazy_to(device, dtype)  # LazyLayers stay lazy on the host: cast on access, nothing read now
        else:  # a whole model on an accelerator is read once (as evaluation needs), not per access
            layers = tuple({k: cast(k, v) for k, v in p.items()} for p in self.layers)
        return replace(self, top={k: cast(k, v) for k, v in self.top.items()}, layers=layers)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the embedding table."""
        return self.top["embed"].dtype

    @property
    def device(self) -> torch.device:
        """Device of the embedding table."""
        return self.top["embed"].device


def rope_for(weights: ModelWeights, seqlen: int, device: torch.device | None = None) -> Rope:
    """Rotary tables for positions ``0 .. seqlen-1``."""
    inv = weights.top["rope.inv_freq"]
    pos = torch.arange(seqlen, device=device or inv.device)
    return make_rope(inv.to(pos.device), pos, weights.rope_scaling)


def embed(weights: ModelWeights, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, hidden)
    """Token embeddings."""
    return F.embedding(tokens, weights.top["embed"])


def head(weights: ModelWeights, x: Tensor) -> Tensor:  # (B, T, hidden) -> (B, T, vocab)
    """Final norm and LM head."""
    x = rms_norm(x, weights.top["final_norm"], weights.args.rms_eps)
    return F.linear(x, weights.top["lm_head"].to(x.dtype))


def forward(weights: ModelWeights, tokens: Tensor, qcfg: QuantConfig | None = None) -> Tensor:
    """Logits ``(B, T, vocab)`` of ``tokens (B, T)``; ``qcfg`` sets the online quantizers."""
    qcfg = qcfg or QuantConfig()
    x = embed(weights, tokens)
    rope = rope_for(weights, tokens.shape[1], tokens.device)
    for p in weights.layers:
        x = layer_forward(p, x, rope, weights.args, qcfg)
    return head(weights, x)
