"""Architecture description of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3): shapes
(:class:`ModelArgs`), the families and their options (:data:`FAMILIES`), and the per-layer tensors a family adds
(:data:`LAYER_TENSORS`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What an architecture (the HF config's ``model_type``) sets in :class:`ModelArgs` beyond its shapes.

    Every field is a :class:`ModelArgs` option of the same name; the loader (:func:`flatquant.models.hf.
    args_from_config`) passes them on as they are, except that ``qkv_bias`` is also on when the HF config says
    ``attention_bias``.
    """

    qkv_bias: bool = False  # q/k/v projections have biases
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (the ``q_norm``/``k_norm`` layer tensors)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
}
"""The supported architectures (HF ``model_type``) and their options: the one table a new family adds a row to."""
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


@dataclass(frozen=True)
class LayerTensor:
    """A per-layer tensor that a family adds beside the seven linears and the two RMSNorms.

    It sits outside every transform site (e.g. a norm on q/k before RoPE), so folding passes it through unchanged;
    the HF loaders read it, checkpoints store it (fp32, ``layers.{i}.{name}``) and expect it, the engine
    keeps it in :attr:`flatquant.models.real.weights.RealLayer.extra`, and random models draw it near 1, all from
    this declaration. Its math is :func:`flatquant.models.layer.qk_pre_rope`.

    Attributes:
        name: key in a layer dict, in checkpoints and in ``RealLayer.extra``.
        hf_name: name under ``model.layers.{i}.`` in HF checkpoints.
        flag: the :class:`ModelArgs` option that says a model has it.
        dim: the :class:`ModelArgs` attribute that is its length (``head_dim``, ``q_dim``, ``kv_dim``, ``hidden``).
    """

    name: str
    hf_name: str
    flag: str
    dim: str

    def present(self, args: ModelArgs) -> bool:
        """Whether a model of ``args`` has this tensor."""
        return bool(getattr(args, self.flag))

    def shape(self, args: ModelArgs) -> tuple[int]:
        """Its shape in a model of ``args``."""
        return (int(getattr(args, self.dim)),)


LAYER_TENSORS: tuple[LayerTensor, ...] = (
    LayerTensor("q_norm", "self_attn.q_norm.weight", flag="qk_norm", dim="head_dim"),  # Qwen3
    LayerTensor("k_norm", "self_attn.k_norm.weight", flag="qk_norm", dim="head_dim"),
)
"""Every family's extra per-layer tensors, in layer-dict order."""


def layer_tensors(args: ModelArgs) -> tuple[LayerTensor, ...]:
    """The :data:`LAYER_TENSORS` a model of ``args`` has."""
    return tuple(e for e in LAYER_TENSORS if e.present(args))


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
