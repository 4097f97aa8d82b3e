"""The site map of a Llama-family decoder layer: which activation feeds which linears, through which online
transform, and which linears the real engine runs fused. Initialisation, folding, the fake forward's statistics,
GPTQ, the real engine, export and the plots all read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    """One activation site of a decoder layer.

    Attributes:
        key: short name (``qkv``, ``o_proj``, ``up_gate``, ``down``): plot sites and fused-linear groups.
        transform: the online transform before the linears (``ln_trans``, ``o_trans``, ...), also the key prefix of
            its parameters.
        linears: the linears that read the site's (transformed) activation, in the order the layer uses them.
        kron: the transform is Kronecker-factored (``.left``/``.right``); else head mixing (one matrix).
        fused: the real engine runs these linears as one transform + quantize and one weight (W4A4).
    """

    key: str
    transform: str
    linears: tuple[str, ...]
    kron: bool
    fused: bool


SITES: tuple[Site, ...] = (
    Site("qkv", "ln_trans", ("q_proj", "k_proj", "v_proj"), kron=True, fused=True),
    Site("o_proj", "o_trans", ("o_proj",), kron=False, fused=False),
    Site("up_gate", "up_gate_trans", ("gate_proj", "up_proj"), kron=True, fused=True),
    Site("down", "down_trans", ("down_proj",), kron=True, fused=False),
)
"""The four sites in layer order."""

SITE_BY_KEY: dict[str, Site] = {s.key: s for s in SITES}
SITE_OF_LINEAR: dict[str, Site] = {n: s for s in SITES for n in s.linears}
KRON_SITES: tuple[str, ...] = tuple(s.transform for s in SITES if s.kron)
"""Transforms with Kronecker factors (``ln_trans``, ``up_gate_trans``, ``down_trans``)."""
FUSED_GROUPS: dict[str, tuple[str, ...]] = {s.key: s.linears for s in SITES if s.fused}
"""Linears that read one transformed activation and run as one fused linear on the W4A4 path."""
