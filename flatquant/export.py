"""Real quantized checkpoints: export from calibrated transforms, verified loading into :class:`RealModel`.

A checkpoint is a folder with

* ``flatquant_config.json``: format name and version, bit widths (``QuantConfig``), architecture (``ModelArgs``),
  transform placement, the model dtype, the backend (``real`` integer kernels, or ``fake`` for bit settings the
  kernels do not implement), and every shard with its byte size and sha256, plus the tensor → shard map;
* ``model-0000N.safetensors`` shards (default at most 4 GiB each) with the tensors of
  :mod:`flatquant.models.real`'s schema under ``top.*`` and ``layers.{i}.*``: packed int4 weights in the GEMM's
  layout, fp32 per-channel scales, fp32 online transform matrices and LAC factors, norms/embeddings/biases in the
  model's own dtype (bf16 stays bf16);
* ``tokenizer/`` when a tokenizer was given.

Weight codes come from the same RTN grid as the fake model: transforms are folded in float64 without weight
quantization (:func:`flatquant.models.flat.fold_layer`), then :func:`flatquant.core.quant.quantize` gives codes
and scales, so ``codes · scale`` equals the fake model's weights (up to the fp32 rounding of the scale).
Loading refuses another format or version, an unsupported or inconsistent architecture, missing, unexpected or
mis-shaped tensors, and shards whose size or sha256 differ from the config (:class:`CheckpointError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .core.kron import decompose_dim
from .core.quant import fake_quant, quantize
from .core.spec import QuantConfig, TransformConfig
from .io import quant_config_from_dict
from .models.args import LINEARS, ModelArgs
from .models.flat import KRON_SITES, fold_layer, site_dim
from .models.model import ModelWeights
from .models.real import RealConfig, RealModel, RealWeights, kernel_supported, layer_from_tensors
from .ops import pack_int4

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
FORMAT = "flatquant-real"
FORMAT_VERSION = 1
CONFIG_NAME = "flatquant_config.json"
DEFAULT_SHARD_BYTES = 4 * 2**30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A real checkpoint that is missing, damaged, tampered with, or made for another model or format."""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def export_layer(
    folded: Params,  # folded layer in float64 with unquantized (LWC-clipped, transformed) weights
    qcfg: QuantConfig,
    *,
    dtype: torch.dtype,
    real: bool,
) -> Params:
    """Checkpoint tensors of one folded layer (schema of :mod:`flatquant.models.real`).

    ``real``: per-channel symmetric RTN codes (packed for 4 bits) and fp32 scales; else fake-quantized float
    weights in ``dtype`` (for bit settings the kernels do not implement).
    """
    out: Params = {"input_norm": folded["input_norm"].to(dtype), "post_norm": folded["post_norm"].to(dtype)}
    for n in LINEARS:
        w = folded[f"{n}.weight"].to(torch.float64)
        if real:
            codes, scale, _ = quantize(w, qcfg.w)
            out[f"{n}.qweight"] = pack_int4(codes) if qcfg.w.bits == 4 else codes
            out[f"{n}.w_scale"] = scale.squeeze(-1).float()
        else:
            out[f"{n}.weight"] = fake_quant(w, qcfg.w).to(dtype)
        if f"{n}.bias" in folded:
            out[f"{n}.bias"] = folded[f"{n}.bias"].to(dtype)
        if f"{n}.lac.lo" in folded:
            out[f"{n}.a_clip"] = torch.sigmoid(torch.cat([folded[f"{n}.lac.lo"].reshape(1),
                                                          folded[f"{n}.lac.hi"].reshape(1)]).double()).float()
    for site in KRON_SITES:
        for side in ("left", "right"):
            if f"{site}.{side}" in folded:
                out[f"{site}.{side}"] = folded[f"{site}.{side}"].float()
    for k in ("o_trans", "k_trans", "k_trans_inv_t"):
        if k in folded:
            out[k] = folded[k].float()
    for n in ("q_quant", "k_cache", "v_cache"):
        if f"{n}.lac.lo" in folded:
            out[f"{n}.clip"] = torch.sigmoid(torch.cat([folded[f"{n}.lac.lo"].reshape(1),
                                                        folded[f"{n}.lac.hi"].reshape(1)]).double()).float()
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


class _ShardWriter:
    """Accumulate tensors and write ``model-0000N.safetensors`` shards of at most ``limit`` bytes."""

    def __init__(self, out_dir: Path, limit: int) -> None:
        self.out_dir, self.limit = out_dir, limit
        self.pending: Params = {}
        self.size = 0
        self.shards: list[dict] = []
        self.weight_map: dict[str, str] = {}

    def add(self, name: str, t: Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[name] = t
        self.size += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        path = self.out_dir / name
        save_file(self.pending, str(path), metadata={"format": FORMAT, "shard": str(len(self.shards) + 1)})
        self.shards.append({"file": name, "bytes": path.stat().st_size, "sha256": _sha256(path)})
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0


def export_checkpoint(
    weights: ModelWeights,
    flats: list[Params],
    qcfg: QuantConfig,
    tcfg: TransformConfig,
    out_dir: Path | str,
    *,
    method: str = "flatquant",
    tokenizer: object | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    extra: dict | None = None,
) -> Path:
    """Fold calibrated transforms into ``weights`` (float64, RTN grid of the fake model) and write a checkpoint.

    Args:
        weights: the original (FP) model; its dtype is the checkpoint's dtype unless ``dtype`` is given.
        flats: per-layer flat transform parameters (from calibration or :func:`flatquant.io.load_transforms`).
        qcfg / tcfg: the bit settings and transform configuration of the calibration.
        out_dir: the checkpoint folder (created; an existing checkpoint there is overwritten).
        tokenizer: saved under ``out_dir/tokenizer`` when given.
        shard_bytes: maximum shard size.

    Returns:
        The path of ``flatquant_config.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).unlink(missing_ok=True)
    for old in out_dir.glob("model-*.safetensors"):
        old.unlink()
    args = weights.args
    dtype = dtype or weights.dtype
    real = kernel_supported(qcfg)
    if not real:
        log.warning("the integer kernels do not implement %s (W%dA%d, w sym=%s, a sym=%s); exporting fake-quantized "
                    "weights that run on the fake path", qcfg.tag, qcfg.w.bits, qcfg.a.bits, qcfg.w.sym, qcfg.a.sym)
    writer = _ShardWriter(out_dir, shard_bytes)
    placement: list[str] = []
    for i, (frozen, flat) in enumerate(zip(weights.layers, flats, strict=True)):
        f64 = {k: v.to(torch.float64) for k, v in frozen.items()}
        folded = fold_layer({k: v.to(torch.float64) for k, v in flat.items()}, f64, args, qcfg, tcfg.kind,
                            quantize_weights=False)
        tensors = export_layer(folded, qcfg, dtype=dtype, real=real)
        if i == 0:
            placement = sorted(k for k in tensors if k.endswith((".left", ".right")) or
                               k in ("o_trans", "k_trans", "k_trans_inv_t"))
        for k, v in tensors.items():
            writer.add(f"layers.{i}.{k}", v)
    top = weights.top
    writer.add("top.embed", top["embed"].to(dtype).contiguous())
    writer.add("top.final_norm", top["final_norm"].to(dtype).contiguous())
    if not args.tie_embeddings:
        writer.add("top.lm_head", top["lm_head"].to(dtype).contiguous())
    writer.add("top.rope.inv_freq", top["rope.inv_freq"].float().contiguous())
    writer.flush()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "backend": "real" if real else "fake",
        "method": method, "quant": asdict(qcfg), "transform": asdict(tcfg), "model": args.to_dict(),
        "rope_scaling": weights.rope_scaling, "dtype": _dtype_name(dtype),
        "placement": {"online_transforms": placement,
                      "description": "ln_trans before q/k/v, up_gate_trans before up/gate, down_trans before "
                                     "down_proj (Kronecker leftᵀ X right per token); o_trans mixes heads before "
                                     "o_proj; k_trans after RoPE on K (q gets k_trans_inv_t); v_trans and diag "
                                     "scales are merged into weights and norms"},
        "shards": writer.shards, "weight_map": writer.weight_map, **(extra or {}),
    }
    path = out_dir / CONFIG_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    tmp.replace(path)
    log.info("wrote %s checkpoint %s (%d shard(s), %.1f MB)", meta["backend"], out_dir, len(writer.shards),
             sum(s["bytes"] for s in writer.shards) / 1e6)
    return path


def read_config(path: Path | str) -> dict:
    """The validated JSON config of a checkpoint folder.

    Raises:
        CheckpointError: no config, invalid JSON, another format/version, or an unsupported architecture.
    """
    folder = Path(path)
    cpath = folder / CONFIG_NAME if folder.is_dir() else folder
    if not cpath.is_file():
        raise CheckpointError(f"{path} is not a flatquant checkpoint (no {CONFIG_NAME}; export one with "
                              "`flatquant export`)")
    try:
        meta = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cpath} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cpath}: expected format {FORMAT} v{FORMAT_VERSION}, found "
                              f"{meta.get('format')} v{meta.get('format_version')}")
    try:
        meta["args"] = ModelArgs(**meta["model"])
        meta["qcfg"] = quant_config_from_dict(meta["quant"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cpath}: unsupported or invalid model/quantization description: {e}") from None
    if meta.get("dtype") not in _DTYPES:
        raise CheckpointError(f"{cpath}: unknown dtype {meta.get('dtype')!r}")
    return meta


def expected_shapes(args: ModelArgs, qcfg: QuantConfig, backend: str, placement: list[str]) -> dict[str, tuple]:
    """``name -> shape`` of every tensor a checkpoint for ``args`` must hold (placement = its online transforms)."""
    shapes: dict[str, tuple] = {"top.embed": (args.vocab_size, args.hidden), "top.final_norm": (args.hidden,),
                                "top.rope.inv_freq": (args.head_dim // 2,)}
    if not args.tie_embeddings:
        shapes["top.lm_head"] = (args.vocab_size, args.hidden)
    mats = {"o_trans": (args.n_heads, args.n_heads), "k_trans": (args.head_dim, args.head_dim),
            "k_trans_inv_t": (args.head_dim, args.head_dim)}
    for site in KRON_SITES:
        n1, n2 = decompose_dim(site_dim(site, args))
        mats[f"{site}.left"], mats[f"{site}.right"] = (n1, n1), (n2, n2)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm"] = shapes[p + "post_norm"] = (args.hidden,)
        for n, (o, k) in args.linear_shapes.items():
            if backend == "real":
                shapes[p + f"{n}.qweight"] = (o, k // 2) if qcfg.w.bits == 4 else (o, k)
                shapes[p + f"{n}.w_scale"] = (o,)
            else:
                shapes[p + f"{n}.weight"] = (o, k)
            if args.qkv_bias and n in ("q_proj", "k_proj", "v_proj"):
                shapes[p + f"{n}.bias"] = (o,)
        for m in placement:
            if m not in mats:
                raise CheckpointError(f"unknown online transform {m!r} in the placement")
            shapes[p + m] = mats[m]
    return shapes


def _optional_key(name: str) -> bool:
    return name.endswith((".a_clip", ".clip"))


def verify_shards(folder: Path, meta: dict) -> None:
    """Check every shard's presence, size and sha256 against the config.

    Raises:
        CheckpointError: a missing, truncated or modified shard.
    """
    for s in meta["shards"]:
        f = folder / s["file"]
        if not f.is_file():
            raise CheckpointError(f"{folder}: shard {s['file']} is missing")
        size = f.stat().st_size
        if size != s["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the config records {s['bytes']} (truncated or replaced)")
        if _sha256(f) != s["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch (the file was modified after export)")


def load_tensors(path: Path | str, *, device: torch.device | str = "cpu", verify: bool = True,
                 expect: ModelArgs | None = None) -> tuple[dict, Params]:
    """``(config, tensors)`` of a checkpoint, validated (checksums, architecture, tensor names and shapes).

    Args:
        expect: refuse a checkpoint whose architecture differs from this one (e.g. the model a tokenizer
            belongs to).
    """
    folder = Path(path)
    meta = read_config(folder)
    args: ModelArgs = meta["args"]
    if expect is not None:
        ours, theirs = expect.to_dict(), args.to_dict()
        diff = [f"{k}={theirs[k]} (expected {ours[k]})" for k in ours if k != "bos_token_id" and ours[k] != theirs[k]]
        if diff:
            raise CheckpointError(f"{folder} is a checkpoint for another architecture: " + ", ".join(diff))
    if verify:
        verify_shards(folder, meta)
    tensors: Params = {}
    for s in meta["shards"]:
        try:
            tensors.update(load_file(str(folder / s["file"]), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / s['file']}: unreadable safetensors file: {e}") from None
    want = expected_shapes(args, meta["qcfg"], meta["backend"], meta["placement"]["online_transforms"])
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(want) if not _optional_key(k))
    wrong = [f"{k} {tuple(tensors[k].shape)} != {want[k]}" for k in want if k in tensors
             and tuple(tensors[k].shape) != tuple(want[k])]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "", f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"wrong shapes {wrong[:4]}" if wrong else ""]
        raise CheckpointError(f"{folder} does not match its architecture ({args.arch}, hidden {args.hidden}, "
                              f"{args.n_layers} layers): " + "; ".join(p for p in parts if p))
    return meta, tensors


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu", *, dtype: torch.dtype | None = None,
                    verify: bool = True, expect: ModelArgs | None = None,
                    compile_decode: bool = False) -> RealModel:
    """Load a checkpoint into a :class:`RealModel` (reference ops on CPU, Triton kernels on CUDA).

    Args:
        dtype: compute dtype; default the checkpoint's dtype, except fp32 checkpoints on CUDA run in bf16.
        verify: check the shards' sizes and sha256 first.

    Raises:
        CheckpointError: see :func:`load_tensors`.
    """
    device = torch.device(device)
    meta, t = load_tensors(path, device=device, verify=verify, expect=expect)
    ck_dtype = _DTYPES[meta["dtype"]]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" and ck_dtype == torch.float32 else ck_dtype
    args: ModelArgs = meta["args"]
    cfg = RealConfig(args=args, qcfg=meta["qcfg"], dtype=dtype, rope_scaling=float(meta.get("rope_scaling", 1.0)),
                     real_linears=meta["backend"] == "real")
    if not cfg.real_linears:
        log.warning("%s: bit setting %s is not implemented by the integer kernels; running the fake path",
                    path, cfg.qcfg.tag)
    layers = []
    for i in range(args.n_layers):
        pre = f"layers.{i}."
        layers.append(layer_from_tensors({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}, cfg))
    top = {"embed": t["top.embed"].to(dtype), "final_norm": t["top.final_norm"].to(dtype),
           "lm_head": t.get("top.lm_head", t["top.embed"]).to(dtype), "rope.inv_freq": t["top.rope.inv_freq"]}
    return RealModel(RealWeights(cfg=cfg, top=top, layers=tuple(layers)), compile_decode=compile_decode)


def load_tokenizer(path: Path | str) -> object:
    """The tokenizer saved with a checkpoint.

    Raises:
        CheckpointError: the checkpoint has no tokenizer.
    """
    tdir = Path(path) / "tokenizer"
    if not tdir.is_dir():
        raise CheckpointError(f"{path} holds no tokenizer (export with a model that has one, or pass --model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tdir))
