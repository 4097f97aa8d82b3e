"""Architecture description of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3)."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
HEAD_NORMS = ("q_norm", "k_norm")
"""Per-head RMSNorm weights ``(head_dim,)`` on q and k before RoPE (Qwen3; present when ``qk_norm``)."""


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Shapes and constants of a decoder-only model; no weights, no transformers import."""

    arch: str = "llama"
    vocab_size: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("vocab_size", "hidden", "intermediate", "n_layers", "n_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def q_dim(self) -> int:
        """Width of the query projection (heads × head_dim)."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key/value projections (kv_heads × head_dim)."""
        return self.n_kv_heads * self.head_dim

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(out, in)`` of the seven linears of a layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (self.q_dim, h),
            "k_proj": (self.kv_dim, h),
            "v_proj": (self.kv_dim, h),
            "o_proj": (h, self.q_dim),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON sidecars."""
        from dataclasses import asdict

        return asdict(self)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The linears of the attention block (HF ``self_attn.*``); the rest are the MLP's (``mlp.*``)."""
