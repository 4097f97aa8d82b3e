"""Calibration settings: every implicit choice of the official loop is a field (defaults = paper)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal


def _check_float(name: str, value: float, *, positive: bool = False, at_most: float | None = None,
                 below: float | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number, >= 0 (> 0 when ``positive``) and within bounds."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > 0 if positive else value >= 0) and (at_most is None or value <= at_most)
          and (below is None or value < below))
    if not ok:
        bound = "> 0" if positive else ">= 0"
        bound += f" and <= {at_most}" if at_most is not None else ""
        bound += f" and < {below}" if below is not None else ""
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """Layer-wise calibration (spec §3).

    Attributes:
        nsamples, seqlen: calibration windows (128 × 2048 in the paper).
        batch_size, epochs: 4 and 15 in the paper (480 steps per layer).
        lr: learning rate of transforms and diag scales; clip logits use ``lr * clip_lr_mult``.
        weight_decay: AdamW decay, applied to every group (the official code's silent default 0.01).
        eta_min_ratio: cosine floor = ``lr * eta_min_ratio``; ``shared_eta_min`` uses that same absolute
            floor for the clip group (official), otherwise each group decays to its own ratio.
        warmup_steps: linear warmup from 1% (0 = off, the paper's default).
        normalize_loss: divide the MSE by its detached value (gradient of log-MSE), as the official code.
        shuffle: visit batches in a random order each epoch (the official code does not).
        amp_dtype: matmul dtype of the training forward: ``auto`` is bfloat16 on CUDA, float32 on CPU.
        compile: ``torch.compile`` the gradient step (``auto``: on CUDA only). It fuses the quantizers'
            elementwise chains: one LLaMA-3-8B layer on the H100 goes from 138 to 44 ms per step and from 35.0 to
            13.1 GiB peak. Compilation runs once per model (about 80 s cold, cached by inductor afterwards).
        cuda_graph: capture the whole step (gradient + AdamW) as a CUDA graph after the first eager step
            and replay it (``auto``: on CUDA, single process); checked against the eager step first, and
            off by default until measured on real models (see bench/README.md).
        recompute: re-run each weight fold and activation quantizer in backward instead of keeping their
            intermediates, for the eager step (8B step: 13.1 -> 4.8 GiB saved for backward). ``auto`` is off: on
            the H100 the eager step got slower (213 -> 286 ms over 2 epochs) and its peak did not drop (35.0 ->
            38.7 GiB), and the compiled step is both faster and smaller. Ignored when compiled.
        weight_quantizer: ``rtn`` or ``gptq`` after reparameterisation.
        deterministic: train with deterministic kernels (``torch.use_deterministic_algorithms``; on CUDA e.g.
            the flash-attention backward without atomic adds), so that a layer's transforms do not depend on the
            run, the GPU or which process of a layer-parallel run trains it (bit-identical results). Off: the
            default, possibly faster, kernels; two runs then differ after training amplifies rounding noise
            (measured on the H200: LWC logits up to 5 apart after 15 epochs on LLaMA-3-8B-shaped layers).
        gptq_percdamp, gptq_blocksize, gptq_act_order: GPTQ settings (spec §5.2).
        seed: seeds the calibration windows and every layer's initial transforms.
    """

    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 4
    epochs: int = 15
    lr: float = 5e-3
    clip_lr_mult: float = 10.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eta_min_ratio: float = 1e-3
    shared_eta_min: bool = True
    warmup_steps: int = 0
    normalize_loss: bool = True
    shuffle: bool = False
    amp_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    cuda_graph: Literal["auto", "on", "off"] = "off"
    recompute: Literal["auto", "on", "off"] = "auto"
    deterministic: bool = True
    weight_quantizer: Literal["rtn", "gptq"] = "rtn"
    gptq_percdamp: float = 0.01
    gptq_blocksize: int = 128
    gptq_act_order: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("nsamples", 1), ("seqlen", 2), ("batch_size", 1), ("epochs", 0), ("warmup_steps", 0),
                          ("gptq_blocksize", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.nsamples % self.batch_size:
            raise ValueError(f"nsamples ({self.nsamples}) must be a multiple of batch_size ({self.batch_size})")
        _check_float("lr", self.lr, positive=True)
        _check_float("clip_lr_mult", self.clip_lr_mult, positive=True)
        _check_float("eps", self.eps, positive=True)
        _check_float("weight_decay", self.weight_decay)
        _check_float("gptq_percdamp", self.gptq_percdamp)
        _check_float("eta_min_ratio", self.eta_min_ratio, at_most=1.0)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        for beta in self.betas:
            _check_float("betas", beta, below=1.0)
        if self.amp_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be auto, float32, bfloat16 or float16, not {self.amp_dtype!r}")
        for name in ("compile", "cuda_graph", "recompute"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be 'auto', 'on' or 'off', not {getattr(self, name)!r}")
        if self.weight_quantizer not in ("rtn", "gptq"):
            raise ValueError(f"weight_quantizer must be 'rtn' or 'gptq', not {self.weight_quantizer!r}")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.nsamples // self.batch_size

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON."""
        return asdict(self)
