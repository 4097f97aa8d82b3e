"""Frozen, validated descriptions of quantizers and transforms (no tensors, no state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Granularity = Literal["per_token", "per_channel", "per_group"]
TransformKind = Literal["none", "svd", "inv", "hadamard", "orthogonal", "identity"]


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """One quantizer: bit width, symmetry, granularity.

    ``bits`` is 2-8, or 16 for "not quantized". Statistics are always taken over the last
    dimension (per token for activations, per output channel for ``(out, in)`` weights);
    ``per_group`` splits the last dimension into groups of ``group_size``.
    """

    bits: int = 16
    sym: bool = True
    granularity: Granularity = "per_token"
    group_size: int | None = None

    def __post_init__(self) -> None:
        is_int = isinstance(self.bits, int) and not isinstance(self.bits, bool)
        if not (is_int and (2 <= self.bits <= 8 or self.bits == 16)):
            raise ValueError(f"bits must be 2-8, or 16 for 'not quantized'; got {self.bits!r}")
        if self.granularity not in ("per_token", "per_channel", "per_group"):
            raise ValueError(f"granularity must be per_token, per_channel or per_group, not {self.granularity!r}")
        if self.granularity == "per_group":
            if self.group_size is None or self.group_size < 1:
                raise ValueError(f"per_group quantization needs a positive group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity='per_group', not {self.granularity!r}")

    @property
    def enabled(self) -> bool:
        """True when this quantizer actually quantizes (bits < 16)."""
        return self.bits < 16

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.sym else 2**self.bits - 1


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Bit settings of a whole W/A/Q/K/V quantization (spec §1)."""

    w: QuantSpec = QuantSpec(bits=16, granularity="per_channel")
    a: QuantSpec = QuantSpec(bits=16)
    q: QuantSpec = QuantSpec(bits=16)
    k: QuantSpec = QuantSpec(bits=16, sym=False)
    v: QuantSpec = QuantSpec(bits=16, sym=False)

    def __post_init__(self) -> None:
        if self.w.granularity == "per_token":
            raise ValueError("weights are quantized per_channel or per_group, not per_token")
        for name in ("a", "q", "k", "v"):
            spec = getattr(self, name)
            if spec.granularity == "per_channel":
                raise ValueError(f"{name}: activations are quantized per_token or per_group")

    @property
    def tag(self) -> str:
        """Short label such as ``w4a4kv4`` or ``w4a16``."""
        t = f"w{self.w.bits}a{self.a.bits}"
        if self.k.enabled or self.v.enabled:
            t += f"k{self.k.bits}v{self.v.bits}" if self.k.bits != self.v.bits else f"kv{self.k.bits}"
        if self.q.enabled:
            t += f"q{self.q.bits}"
        return t


@dataclass(frozen=True, kw_only=True)
class TransformConfig:
    """Which transforms a decoder layer gets and how they are parametrised (spec §2).

    Attributes:
        kind: ``svd`` (Cayley U·diag(σ)·Vᵀ, exact inverse-transpose), ``inv`` (free matrix,
            float64 inverse), ``hadamard`` / ``orthogonal`` (fixed, not trained), ``identity``,
            or ``none`` (no Kronecker/per-head transforms at all).
        add_diag: add a learnable per-channel scaling before the ln/up_gate/down transforms.
        diag_init: ``smoothquant`` (s = wmax^(1-α)/xmax^α) or ``ones``.
        diag_alpha: the SmoothQuant α.
        lwc / lac: learnable weight / activation clipping.
        clip_init: initial clip logit (sigmoid(4) ≈ 0.982).
        trainable: whether the transforms (and diag) are trained.
    """

    kind: TransformKind = "svd"
    add_diag: bool = True
    diag_init: Literal["smoothquant", "ones"] = "smoothquant"
    diag_alpha: float = 0.3
    lwc: bool = True
    lac: bool = True
    clip_init: float = 4.0
    trainable: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.diag_alpha <= 1.0:
            raise ValueError(f"diag_alpha must be in [0, 1], got {self.diag_alpha}")
        if self.trainable and self.kind in ("hadamard", "orthogonal", "identity"):
            raise ValueError(f"transform kind {self.kind!r} is fixed; set trainable=False")

    @property
    def has_kron(self) -> bool:
        """True when Kronecker and per-head transforms are inserted."""
        return self.kind != "none"
