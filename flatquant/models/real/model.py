"""The real model: prefill/decode over a :class:`KVCache`, compiled layers, graphed paths, generation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.norm import rms_norm
from .cache import KVCache, new_cache
from .graphs import CUDAGraphDecoder, CUDAGraphPrefill
from .sampling import check_sampling, sample
from .step import decode_layer, layer_step, rope_at
from .weights import RealWeights

log = logging.getLogger(__name__)
Params = dict[str, Tensor]

GEN_BUCKET = 256
"""On CUDA, :meth:`RealModel.generate` sizes its reusable cache to a multiple of this many positions."""


class CompiledOrEager:
    """``torch.compile(fn, fullgraph=True)`` that falls back to ``fn`` for good, with one logged warning, once
    dynamo's recompile limit is hit (many models or shapes in one process), instead of failing the call."""

    def __init__(self, fn: Callable[..., Tensor], *, dynamic: bool | None = None) -> None:
        self.fn = fn
        self.compiled: Callable[..., Tensor] | None = torch.compile(fn, fullgraph=True, dynamic=dynamic)

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        """``fn(*args, **kwargs)``, compiled while dynamo allows."""
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                log.warning("%s: torch.compile recompile limit reached; running it uncompiled from now on "
                            "(raise torch._dynamo.config.cache_size_limit to keep it compiled)", self.fn.__name__)
                self.compiled = None
        return self.fn(*args, **kwargs)


class RealModel:
    """Inference over :class:`RealWeights`: prefill/decode with a :class:`KVCache`, logits out.

    Args:
        weights: the model tensors (on one device).
        compile_decode: wrap the per-layer decode step in ``torch.compile`` (fuses RoPE, norms, residuals and
            casts around the custom ops); None: on CUDA only.
        compile_prefill: the same for the prefill layer (shapes become dynamic after the second prompt shape);
            None: on CUDA only.
    """

    def __init__(self, weights: RealWeights, *, compile_decode: bool | None = None,
                 compile_prefill: bool | None = None) -> None:
        self.weights = weights
        self.cfg = weights.cfg
        cuda = weights.device.type == "cuda"
        self._decode_layer = CompiledOrEager(decode_layer, dynamic=False) \
            if (cuda if compile_decode is None else compile_decode) else decode_layer
        self._prefill_layer = CompiledOrEager(layer_step) \
            if (cuda if compile_prefill is None else compile_prefill) else layer_step

        self._static: dict[tuple[int, int], KVCache] = {}
        self._prefill_graphs: dict[tuple[int, int, int], CUDAGraphPrefill] = {}
        self._decoders: dict[int, CUDAGraphDecoder] = {}
        self._generating: set[tuple[int, int]] = set()

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.weights.device

    def new_cache(self, batch: int, max_len: int, start: Tensor | None = None) -> KVCache:
        """An empty cache on the model's device (see :func:`new_cache`)."""
        return new_cache(self.cfg, batch, max_len, self.device, start)

    def static_cache(self, batch: int, max_len: int) -> KVCache:
        """The engine's reusable cache for ``(batch, max_len)``, emptied (like transformers' static cache: one per
        shape, so captured CUDA graphs stay valid; the next call with the same shape reuses and overwrites it)."""
        cache = self._static.get((batch, max_len))
        if cache is None:
            cache = self._static[(batch, max_len)] = self.new_cache(batch, max_len)
        cache.seen = 0
        return cache

    @torch.no_grad()
    def prefill_graphed(self, tokens: Tensor, cache: KVCache) -> Tensor:  # (B, T) -> (B, vocab)
        """Next-token logits of ``tokens`` written into the empty, unpadded ``cache``, replayed from a CUDA graph
        captured once per ``(B, T, cache)`` (removes the host time of launching every kernel of every layer)."""
        if cache.seen != 0 or cache.padded:
            raise ValueError("graphed prefill needs an empty cache without left padding")
        key = (tokens.shape[0], tokens.shape[1], cache.layers[0].k.data_ptr())
        graph = self._prefill_graphs.get(key)
        if graph is None:
            graph = self._prefill_graphs[key] = CUDAGraphPrefill(self, tokens.shape[0], tokens.shape[1], cache)
        return graph.run(tokens)

    def graphed_decoder(self, cache: KVCache) -> CUDAGraphDecoder:
        """The :class:`CUDAGraphDecoder` of ``cache``, captured on first use and kept for its later prefills."""
        key = cache.layers[0].k.data_ptr()
        dec = self._decoders.get(key)
        if dec is None or dec.cache is not cache:
            dec = self._decoders[key] = CUDAGraphDecoder(self, cache)
        return dec

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> Tensor:
        """Logits ``(B, T, vocab)`` of new ``tokens (B, T)``, appended to ``cache`` (a fresh one if None);
        ``(B, 1, vocab)`` of the last position only with ``last_only``.

        With a cache holding ``seen`` positions, the tokens take positions ``seen .. seen+T-1``; rows with left
        padding (``cache.start``) get RoPE positions counted from their first real token.
        """
        w, cfg = self.weights, self.cfg
        b, t = tokens.shape
        if cache is None:
            cache = self.new_cache(b, t)
        if cache.seen + t > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.seen} used, {t} more requested")
        dev = tokens.device
        idx = torch.arange(cache.seen, cache.seen + t, device=dev)
        pos = (idx[None, :] - cache.start[:, None].long()).clamp(min=0)
        rope = rope_at(w.top["rope.inv_freq"], pos, cfg.rope_scaling)
        length = torch.full((b,), cache.seen + t, dtype=torch.int32, device=dev)
        decode = t == 1 and cache.seen > 0
        causal0 = cache.seen == 0 and not cache.padded
        x = F.embedding(tokens, w.top["embed"]).to(cfg.dtype)
        for layer, kv in zip(w.layers, cache.layers, strict=True):
            if decode:
                x = self._decode_layer(layer, x, rope, kv, cfg, idx, cache.start, length)
            else:
                x = self._prefill_layer(layer, x, rope, kv, cfg, idx, cache.start, length, n_valid=cache.seen + t,
                                        decode=False, causal_from_zero=causal0, k_packed=cache.k_packed,
                                        v_packed=cache.v_packed)
        cache.seen += t
        return self._logits(x[:, -1:] if last_only else x)

    __call__ = forward

    def _logits(self, x: Tensor) -> Tensor:  # (B, T, hidden) -> (B, T, vocab)
        """Final norm and LM head."""
        top, cfg = self.weights.top, self.cfg
        return F.linear(rms_norm(x, top["final_norm"].to(cfg.dtype), cfg.args.rms_eps), top["lm_head"].to(cfg.dtype))

    def decode_step(self, tok: Tensor, pos: Tensor, cache: KVCache) -> Tensor:  # (B, 1), (1,) -> (B, vocab)
        """One decode step with the position as a device tensor: no host synchronisation and no Python state
        read from the cache, so it can be captured in a CUDA graph (:class:`CUDAGraphDecoder`). The caller
        advances ``cache.seen``."""
        w, cfg = self.weights, self.cfg
        b = tok.shape[0]
        positions = (pos[None, :] - cache.start[:, None].long()).clamp(min=0)
        rope = rope_at(w.top["rope.inv_freq"], positions, cfg.rope_scaling)
        length = (pos + 1).to(torch.int32).expand(b)
        x = F.embedding(tok, w.top["embed"]).to(cfg.dtype)
        for layer, kv in zip(w.layers, cache.layers, strict=True):
            x = self._decode_layer(layer, x, rope, kv, cfg, pos, cache.start, length)
        return self._logits(x)[:, -1]

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield new tokens ``(B,)`` one step at a time (greedy at ``temperature == 0``, else top-p sampling).

        Args:
            prompt: ``(B, T)`` token ids (no padding).
        """
        check_sampling(max_new_tokens, temperature, top_p)
        b, t = prompt.shape
        graphed = self.device.type == "cuda" and max_new_tokens > 1
        # On CUDA every decode step is one CUDA-graph replay. The cache and its captured graph are kept per
        # (batch, capacity rounded up to GEN_BUCKET), so a later call of a similar size starts without a capture;
        # a call whose key is still held by an unfinished generator gets a cache and graph of its own.
        key = (b, -(-(t + max_new_tokens) // GEN_BUCKET) * GEN_BUCKET)
        shared = graphed and key not in self._generating
        cache = self.static_cache(*key) if shared else self.new_cache(b, t + max_new_tokens)
        if shared:
            self._generating.add(key)
        try:
            logits = self.forward(prompt, cache, last_only=True)[:, -1]
            graph = None
            if graphed:
                graph = self.graphed_decoder(cache) if shared else CUDAGraphDecoder(self, cache)
            done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
            for _ in range(max_new_tokens):
                nxt = sample(logits, temperature, top_p, generator)
                yield nxt
                if eos_token_id is not None:
                    done |= nxt == eos_token_id
                    if bool(done.all()):
                        return
                logits = graph.step(nxt) if graph is not None else self.forward(nxt[:, None], cache)[:, -1]
        finally:
            if shared:
                self._generating.discard(key)
