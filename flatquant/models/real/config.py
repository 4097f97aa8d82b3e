"""Static description of a real model: which bit settings run on the integer kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.spec import QuantConfig, QuantSpec
from ...ops.qlinear import KERNEL_BIT_PAIRS
from ..args import ModelArgs


def kernel_supported(qcfg: QuantConfig) -> bool:
    """Whether the integer kernels implement ``qcfg``'s weight/activation quantizers (else: fake fallback)."""
    w, a = qcfg.w, qcfg.a
    return ((a.bits, w.bits) in KERNEL_BIT_PAIRS and w.sym and a.sym
            and w.granularity == "per_channel" and a.granularity == "per_token")


def kv_packed(spec: QuantSpec) -> bool:
    """Whether a K/V quantizer is stored as packed nibbles (asymmetric per token and head, 2-4 bits)."""
    return spec.enabled and not spec.sym and spec.bits <= 4 and spec.granularity == "per_token"


@dataclass(frozen=True, kw_only=True)
class RealConfig:
    """Static description of a real model.

    Attributes:
        args: architecture.
        qcfg: bit settings (the fake model's :class:`QuantConfig`).
        dtype: compute dtype of activations (bf16/fp16 on GPU; fp32 on CPU reproduces the fp32 fake model).
        rope_scaling: HF's ``attention_scaling`` on cos/sin.
        real_linears: integer kernels (True) or the fake fallback (False).
        fuse: run q/k/v and gate/up as one transform + quantize and one weight (W4A4; :class:`FusedQLinear`).
        cpu_codes: on CPU, also keep the W4A4 weight codes unpacked as int8 (one byte per weight, twice the packed
            size), so the CPU GEMM runs ``torch._int_mm`` without unpacking them on every call (same results;
            :func:`gemm4`).
    """

    args: ModelArgs
    qcfg: QuantConfig
    dtype: torch.dtype = torch.bfloat16
    rope_scaling: float = 1.0
    real_linears: bool = True
    fuse: bool = True
    cpu_codes: bool = True

    def __post_init__(self) -> None:
        assert self.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {self.dtype}"
        assert not (self.real_linears and not kernel_supported(self.qcfg)), "kernels do not support these bits"
