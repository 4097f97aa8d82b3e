"""The method registry: every quantization method by name, and the one rule for which of them need data.

A method is a named composition of the same machinery (:class:`Method`): the per-layer transforms of
:class:`~flatquant.core.spec.TransformConfig` at every site of the site map (:mod:`flatquant.models.sites`), which
of their parts are trained, whether calibration data is needed, where each part ends up at deployment, and a slot
for a model-wide transform (:class:`GlobalTransform`). The CLI (choices and defaults of ``--method`` and
``--methods``), :func:`flatquant.api.quantize_model`, the plots' baselines and the calibration loop all read this
file, so a new per-layer method that reuses existing transform kinds is one entry in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from ..core.spec import TransformConfig, TransformKind
from ..models.flat import TRAINABLE_KINDS
from ..models.sites import SITES

if TYPE_CHECKING:
    from ..models.model import ModelWeights

DEFAULT_METHOD = "flatquant"
"""What ``flatquant calibrate`` runs unless ``--method`` says otherwise."""
UNQUANTIZED = "fp"
"""The baseline that quantizes nothing (``eval``'s default)."""


def needs_data(tcfg: TransformConfig) -> bool:
    """Whether per-layer transforms need calibration data: something is trained (transforms, diag scales, LWC, LAC),
    or the diag scales start from activation statistics (the SmoothQuant init).

    This is the only place the question is decided; :attr:`Method.needs_data` and the calibration loop ask it.
    """
    return tcfg.trainable or tcfg.lwc or tcfg.lac or (tcfg.add_diag and tcfg.diag_init == "smoothquant")


@dataclass(frozen=True, kw_only=True)
class GlobalTransform:
    """The slot for a model-wide transform of the residual stream (a SpinQuant-style R1); no registered method fills
    it yet, and :func:`apply_global_transform` refuses one.

    Where it is applied: once, to the FP model, before layer-wise calibration, in :func:`apply_global_transform`
    (called by :func:`flatquant.api.quantize_model`; ``from_transforms`` and the checkpoint export would call it the
    same way on the loaded FP weights before folding). An implementation

    1. folds every RMSNorm weight into the linears that read its output (``input_norm`` into q/k/v, ``post_norm``
       into gate/up, ``final_norm`` into ``lm_head``), so that the norms commute with an orthogonal ``R``;
    2. folds ``R`` into the embeddings and the LM head: ``embed ← embed · R``, ``lm_head ← lm_head · R``;
    3. folds it into every layer: the linears that read the residual stream (q/k/v, gate/up) ``W ← W · R``, the
       ones that write it (o_proj, down_proj) ``W ← Rᵀ · W``.

    Nothing runs online, so the engine and the checkpoint format stay as they are; the per-layer transforms of the
    method are then calibrated on the rotated model.

    Attributes:
        kind: ``hadamard`` (a fixed randomised Hadamard, QuaRot's R1) or ``learned`` (Cayley-parametrised and
            trained on calibration data, SpinQuant's R1).
        seed: seed of the random signs or of the initial rotation.
    """

    kind: Literal["hadamard", "learned"]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "learned"):
            raise ValueError(f"global transform kind must be 'hadamard' or 'learned', got {self.kind!r}")


@dataclass(frozen=True, kw_only=True)
class Method:
    """A named quantization method: a composition of the transform machinery.

    Attributes:
        name: the registry key and ``--method`` value.
        summary: one line for ``--help`` (no semicolon: the CLI joins summaries with them).
        layer: the per-layer transforms: their kind (the same at every site), the per-channel diag scales and their
            init, learnable weight/activation clipping, and whether transforms and scales train.
        quantize: False only for the unquantized baseline (nothing is transformed or quantized, whatever the bit
            setting).
        global_transform: the model-wide transform applied before the per-layer ones (see :class:`GlobalTransform`);
            None for every registered method.
    """

    name: str
    summary: str
    layer: TransformConfig
    quantize: bool = True
    global_transform: GlobalTransform | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a method name is letters, digits, '-' and '_', got {self.name!r}")
        if not isinstance(self.layer, TransformConfig):
            raise ValueError(f"method {self.name!r}: layer must be a TransformConfig, got {type(self.layer).__name__}")
        if not (self.global_transform is None or isinstance(self.global_transform, GlobalTransform)):
            raise ValueError(f"method {self.name!r}: global_transform must be a GlobalTransform or None")
        if not self.quantize and (self.layer.has_kron or self.layer.add_diag or needs_data(self.layer)
                                  or self.global_transform is not None):
            raise ValueError(f"method {self.name!r} quantizes nothing, so it can have no transforms")

    @property
    def needs_data(self) -> bool:
        """Whether calibration data is needed (per-layer statistics or training, or a learned global transform)."""
        learned_global = self.global_transform is not None and self.global_transform.kind == "learned"
        return self.quantize and (needs_data(self.layer) or learned_global)

    @property
    def trained(self) -> tuple[str, ...]:
        """The parts calibration trains: among ``transforms``, ``diag``, ``lwc`` (weight clipping) and ``lac``
        (activation clipping)."""
        t = self.layer
        parts = (("transforms", t.trainable and t.kind in TRAINABLE_KINDS), ("diag", t.trainable and t.add_diag),
                 ("lwc", t.lwc), ("lac", t.lac))
        return tuple(name for name, on in parts if on) if self.quantize else ()

    @property
    def site_kinds(self) -> dict[str, TransformKind]:
        """Kind of each per-layer transform (the site map's four, plus ``k_trans`` after RoPE and ``v_trans``);
        empty when the method has none. Which of them a layer gets also depends on the bit setting."""
        if not (self.quantize and self.layer.has_kron):
            return {}
        return {**{s.transform: self.layer.kind for s in SITES}, "k_trans": self.layer.kind,
                "v_trans": self.layer.kind}

    @property
    def folds(self) -> dict[str, str]:
        """Where each calibrated part ends up in the deployed model (what :func:`flatquant.models.flat.fold_layer`
        and the checkpoint export do with it)."""
        if not self.quantize:
            return {}
        t, out = self.layer, {}
        if self.global_transform is not None:
            out["global"] = "embed, lm_head and every layer's linears (offline; the norms folded first)"
        if t.add_diag:
            out["diag"] = "input_norm, post_norm and up_proj's rows; the inverse into the reading linears' columns"
        if t.has_kron:
            online = ", ".join("/".join(s.linears) for s in SITES)
            out["transforms"] = (f"online before {online} and on K after RoPE; the inverse-transpose into those "
                                 "weights; v_trans wholly into v_proj and o_proj")
        if t.lwc:
            out["lwc"] = "the weights (clipped before quantization)"
        if t.lac:
            out["lac"] = "online: the clip factors of the activation and KV quantizers"
        return out


_NO_TRANSFORMS = TransformConfig(kind="none", add_diag=False, lwc=False, lac=False, trainable=False)

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    Method(name=UNQUANTIZED, summary="the model as loaded, nothing quantized", layer=_NO_TRANSFORMS, quantize=False),
    Method(name="rtn", summary="round-to-nearest, no transform or clipping", layer=_NO_TRANSFORMS),
    Method(name="smoothquant", summary="SmoothQuant-style per-channel scaling (alpha 0.5, from activation maxima) "
                                       "folded into the norms and up_proj",
           layer=TransformConfig(kind="none", add_diag=True, diag_alpha=0.5, lwc=False, lac=False, trainable=False)),
    Method(name="quarot", summary="QuaRot-style fixed randomised Hadamard, Kronecker-factored (Haar-orthogonal "
                                  "where no Sylvester Hadamard exists)",
           layer=TransformConfig(kind="hadamard", add_diag=False, lwc=False, lac=False, trainable=False)),
    Method(name="flatquant", summary="learned Kronecker affine transforms, diag scaling, LWC and LAC (the paper's "
                                     "settings)",
           layer=TransformConfig()),
)})
"""Every method by name, in the order tables and ``compare`` list them (read-only)."""


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_names(*, quantize: bool | None = None, data_free: bool | None = None) -> tuple[str, ...]:
    """Registered method names in registry order, filtered when given: ``quantize`` (:attr:`Method.quantize`),
    ``data_free`` (not :attr:`Method.needs_data`)."""
    return tuple(n for n, m in METHODS.items() if (quantize is None or m.quantize == quantize)
                 and (data_free is None or m.needs_data != data_free))


def method_config(method: str, **overrides: Any) -> TransformConfig:
    """The per-layer transform configuration of a registered method, with field overrides.

    Raises:
        ValueError: an unknown method.
    """
    layer = get_method(method).layer
    return replace(layer, **overrides) if overrides else layer


def apply_global_transform(weights: ModelWeights, method: Method | None) -> ModelWeights:
    """``weights`` with ``method``'s global transform folded in (see :class:`GlobalTransform` for where and how).

    Returns ``weights`` itself when the method has none (every registered method).

    Raises:
        NotImplementedError: the method has a global transform; none is implemented yet.
    """
    if method is None or method.global_transform is None:
        return weights
    raise NotImplementedError(f"method {method.name!r}: global transforms ({method.global_transform.kind} R1) are a "
                              "documented slot only; implement them in flatquant.calib.methods."
                              "apply_global_transform")
