"""A transformers face for :class:`~flatquant.models.real.RealModel`: ``generate()`` and lm-eval's ``HFLM``.

:class:`FlatQuantForCausalLM` is a small ``PreTrainedModel`` + ``GenerationMixin`` whose ``forward`` takes
``input_ids`` / ``attention_mask`` / ``past_key_values`` and returns logits. The cache is our
:class:`~flatquant.models.real.KVCache` (packed 4-bit, per KV head), created by ``generate`` through
``_prepare_cache_for_generation`` with the batch's left padding taken from ``attention_mask``; ``forward`` feeds only
the positions the cache has not seen. Without a cache (lm-eval log-likelihoods) every call is a fresh prefill.
Checked with transformers 5.x (greedy and sampling ``generate``) and lm-eval 0.4.13 (``HFLM(pretrained=model)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..core.spec import QuantConfig
from .model import ModelWeights, forward
from .real import KVCache, RealConfig, RealModel


class TokenCache:
    """The "cache" of :class:`FakeModel`: the tokens seen so far (the fake path recomputes the whole sequence)."""

    is_compileable = False

    def __init__(self) -> None:
        self.tokens: Tensor | None = None

    @property
    def seen(self) -> int:
        """Positions seen."""
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen (transformers' cache protocol)."""
        return self.seen


class FakeModel:
    """The fake-quantized model (:func:`flatquant.models.model.forward`) behind the same interface as
    :class:`RealModel`, so :class:`FlatQuantForCausalLM` (generate, lm-eval) serves both paths.
    Each step recomputes the full sequence; left padding is not supported."""

    def __init__(self, weights: ModelWeights, qcfg: QuantConfig) -> None:
        self.weights, self.qcfg = weights, qcfg
        self.cfg = RealConfig(args=weights.args, qcfg=qcfg, dtype=weights.dtype, real_linears=False)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.weights.device

    def new_cache(self, batch: int, max_len: int, start: Tensor | None = None) -> TokenCache:
        """A token cache (``start``, left padding, is refused)."""
        if start is not None and bool((start > 0).any()):
            raise ValueError("the fake-path wrapper does not support left-padded batches; use batch size 1")
        return TokenCache()

    @torch.no_grad()
    def forward(self, tokens: Tensor, cache: TokenCache | None = None) -> Tensor:  # (B, T) -> (B, T, vocab)
        """Logits of the new ``tokens`` given the cached prefix."""
        cache = cache or TokenCache()
        full = tokens if cache.tokens is None else torch.cat([cache.tokens, tokens], 1)
        cache.tokens = full
        return forward(self.weights, full, self.qcfg)[:, -tokens.shape[1]:]


def hf_config(model: RealModel | FakeModel, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
              max_position_embeddings: int = 8192) -> LlamaConfig:
    """A ``LlamaConfig`` describing the real model's shapes (for transformers and lm-eval bookkeeping)."""
    a = model.cfg.args
    return LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                       head_dim=a.head_dim, rms_norm_eps=a.rms_eps, bos_token_id=a.bos_token_id,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=False,
                       max_position_embeddings=max_position_embeddings)


class FlatQuantForCausalLM(PreTrainedModel, GenerationMixin):
    """``PreTrainedModel`` wrapper of a :class:`RealModel` (no trainable parameters; inference only)."""

    config_class = LlamaConfig
    base_model_prefix = "flatquant"

    def __init__(self, config: LlamaConfig, real: RealModel | FakeModel) -> None:
        super().__init__(config)
        self.real = real
        self.register_buffer("_device_anchor", torch.zeros(0, device=real.device), persistent=False)

    @classmethod
    def wrap(cls, real: RealModel | FakeModel, tokenizer: Any = None) -> FlatQuantForCausalLM:
        """Wrap ``real``; EOS/PAD ids come from ``tokenizer`` when given."""
        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        m = cls(hf_config(real, eos_token_id=eos, pad_token_id=pad if pad is not None else eos), real)
        m.generation_config.eos_token_id = eos
        m.generation_config.pad_token_id = pad if pad is not None else eos
        return m.eval()

    @property
    def device(self) -> torch.device:
        """The real model's device."""
        return self.real.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype."""
        return self.real.cfg.dtype

    def get_input_embeddings(self) -> torch.nn.Module:
        """An ``nn.Embedding`` view of the embedding table (transformers asks for it)."""
        return torch.nn.Embedding.from_pretrained(self.real.weights.top["embed"], freeze=True)

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to tie (the weights are plain tensors)."""

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, generation_mode: Any,
                                      batch_size: int, max_cache_length: int) -> None:
        if isinstance(model_kwargs.get("past_key_values"), (KVCache, TokenCache)):
            return
        mask = model_kwargs.get("attention_mask")
        start = None
        if mask is not None and bool((mask[:, 0] == 0).any()):
            if bool((mask[:, -1] == 0).any()):
                raise ValueError("right padding is not supported for generation; use padding_side='left'")
            start = (mask == 0).sum(-1).to(torch.int32)
        model_kwargs["past_key_values"] = self.real.new_cache(batch_size, max_cache_length, start)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: KVCache | None = None,
                                      attention_mask: Tensor | None = None, **kwargs: Any) -> dict:
        """Pass the whole sequence; :meth:`forward` skips the positions already in the cache."""
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits of the positions of ``input_ids (B, T)`` not yet in ``past_key_values``.

        Without a cache, left padding in ``attention_mask`` is honoured (positions and attention skip it).
        """
        cache = past_key_values if isinstance(past_key_values, (KVCache, TokenCache)) else None
        if cache is None:
            start = None
            if attention_mask is not None and bool((attention_mask[:, 0] == 0).any()):
                start = (attention_mask.cumsum(-1) == 0).sum(-1).to(torch.int32)
            cache = self.real.new_cache(input_ids.shape[0], input_ids.shape[1], start)
        new = input_ids[:, cache.seen:]
        logits = self.real.forward(new.to(self.device), cache)
        return CausalLMOutputWithPast(logits=logits.float(), past_key_values=cache)
