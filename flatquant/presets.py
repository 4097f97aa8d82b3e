"""Named bit settings. The methods (compositions of the transform machinery) are in :mod:`flatquant.calib.methods`."""

from __future__ import annotations

from .core.spec import QuantConfig, QuantSpec


def bits_config(w: int = 16, a: int = 16, k: int = 16, v: int = 16, q: int = 16, *, w_asym: bool = False,
                a_asym: bool = False, kv_asym: bool = True, w_group: int | None = None) -> QuantConfig:
    """A :class:`QuantConfig` from bit widths (per-channel weights, per-token activations, per-head KV).

    Widths are 2-8, or 16 for "not quantized"; ``w_group`` (per-group weights) must be positive.

    Raises:
        ValueError: a width or group size out of range, naming which one.
    """
    for name, bits in (("w", w), ("a", a), ("k", k), ("v", v), ("q", q)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not (2 <= bits <= 8 or bits == 16):
            raise ValueError(f"{name} bits must be 2-8, or 16 for 'not quantized'; got {bits!r}")
    if w_group is not None and (not isinstance(w_group, int) or w_group < 1):
        raise ValueError(f"weight group size must be a positive integer, got {w_group!r}")
    wg = QuantSpec(bits=w, sym=not w_asym, granularity="per_group", group_size=w_group) if w_group is not None \
        else QuantSpec(bits=w, sym=not w_asym, granularity="per_channel")
    return QuantConfig(w=wg, a=QuantSpec(bits=a, sym=not a_asym), q=QuantSpec(bits=q, sym=not a_asym),
                       k=QuantSpec(bits=k, sym=not kv_asym), v=QuantSpec(bits=v, sym=not kv_asym))


BIT_PRESETS: dict[str, QuantConfig] = {
    "w4a4kv4": bits_config(4, 4, 4, 4),
    "w4a4": bits_config(4, 4),
    "w4a16": bits_config(4, 16),
    "w4a8": bits_config(4, 8),
    "w8a8": bits_config(8, 8),
    "w4a8kv4": bits_config(4, 8, 4, 4),
    "w3a3kv3": bits_config(3, 3, 3, 3),
    "w16a16kv4": bits_config(16, 16, 4, 4),
    "fp": bits_config(),
}


def bits_preset(name: str) -> QuantConfig:
    """A named bit setting such as ``w4a4kv4``."""
    if name not in BIT_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(BIT_PRESETS)}")
    return BIT_PRESETS[name]
