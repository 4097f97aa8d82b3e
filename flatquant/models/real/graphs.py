"""CUDA-graph replay of whole prefills and of decode steps (no per-kernel launch cost)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .cache import KVCache

if TYPE_CHECKING:
    from .model import RealModel


def capture(fn: Callable[[], Tensor], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """``(graph, output)`` of ``fn`` captured as a CUDA graph, after two warm-up calls on a side stream that
    compile and autotune every kernel (capture must not see first-call work)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = fn()
    return graph, out


class CUDAGraphPrefill:
    """A prefill of ``(batch, length)`` tokens into one empty cache, replayed from a CUDA graph.

    Two warm-up runs on a side stream compile and autotune every kernel; the capture then records the whole
    forward (all layers, the final norm and the last position's logits). Each :meth:`run` copies the tokens into
    the static buffer, replays, and marks the cache as holding ``length`` positions.
    """

    def __init__(self, model: RealModel, batch: int, length: int, cache: KVCache) -> None:
        self.cache, self.length = cache, length
        self.tok = torch.zeros(batch, length, dtype=torch.long, device=model.device)

        def prefill() -> Tensor:  # every call starts from the empty cache
            cache.seen = 0
            return model.forward(self.tok, cache, last_only=True)[:, -1]

        self.graph, self.out = capture(prefill, model.device)
        cache.seen = 0

    def run(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, vocab), valid until the next run
        """Prefill ``tokens`` and return the last position's logits."""
        self.tok.copy_(tokens)
        self.graph.replay()
        self.cache.seen = self.length
        return self.out


class CUDAGraphDecoder:
    """Decode steps of a :class:`RealModel` replayed from one CUDA graph (removes per-op launch overhead).

    Captures :meth:`RealModel.decode_step` on static token/position buffers for one cache (its tensors stay in
    place); the warm-up before capture compiles/autotunes the kernels and writes a throw-away K/V at position
    ``cache.seen``, which the first real step overwrites before reading it.
    """

    def __init__(self, model: RealModel, cache: KVCache) -> None:
        dev = model.device
        self.model, self.cache = model, cache
        self.tok = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.seen, dtype=torch.long, device=dev)
        self.graph, self.out = capture(lambda: model.decode_step(self.tok, self.pos, cache), dev)

    def step(self, tok: Tensor) -> Tensor:  # (B,) -> (B, vocab), valid until the next step
        """Append ``tok`` at the next position and return the next-token logits."""
        if self.cache.seen >= self.cache.max_len:
            raise ValueError("KV cache is full")
        self.tok.copy_(tok[:, None])
        self.pos.fill_(self.cache.seen)
        self.graph.replay()
        self.cache.seen += 1
        return self.out
