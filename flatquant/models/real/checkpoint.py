"""Real quantized checkpoints: export from calibrated transforms, verified loading into :class:`RealModel`.

A checkpoint (format ``flatquant-real`` v2) is a folder with

* ``flatquant_config.json``: format name and version, bit widths (``QuantConfig``), architecture (``ModelArgs``),
  transform placement, the storage dtype, the backend (``real`` integer kernels, or ``fake`` for bit settings the
  kernels do not implement), ``tied`` (embedding and LM head stored once), ``embed_bits`` (``null``: embedding/LM
  head in the storage dtype; ``8``: per-row symmetric int8 codes + fp32 scales), every shard and tokenizer file with
  its byte size and sha256, the tensor → shard map, and ``config_sha256``, a checksum of everything else in the
  config (so edited bit widths, ``rms_eps``, ``rope_scaling`` or dtype are refused, not run);
* ``model-0000N.safetensors`` shards (default at most 4 GiB each) with the tensors of
  :mod:`flatquant.models.real`'s schema under ``top.*`` and ``layers.{i}.*``: packed int4 weights in the GEMM's
  layout, fp32 per-channel scales, fp32 online transform matrices, LAC factors, norms and biases, embeddings in the
  storage dtype (by default the model's own 16-bit dtype: see :func:`declared_dtype`);
* ``tokenizer/`` when a tokenizer was given.

Weight codes come from the same RTN grid as the fake model: transforms are folded in float64 without weight
quantization (:func:`flatquant.models.flat.fold_layer`), then :func:`flatquant.core.quant.quantize` gives codes
and scales, so ``codes · scale`` equals the fake model's weights (up to the fp32 rounding of the scale).
Export writes into a hidden sibling folder and swaps it in at the end, so an interrupted export never damages
the checkpoint it replaces. Loading refuses another format or version (v1 checkpoints must be re-exported), an
edited or incomplete config, an unsupported or inconsistent architecture, missing, unexpected or mis-shaped
tensors, and shards whose size or sha256 differ from the config (:class:`CheckpointError`).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ...calib.workdir import fsync_path
from ...core.kron import decompose_dim
from ...core.quant import fake_quant, qparams, quantize, quantize_codes
from ...core.spec import QuantConfig, QuantSpec, TransformConfig
from ...io import quant_config_from_dict, read_format_json
from ...ops import pack_int4
from ..args import LAYER_TENSORS, LINEARS, ModelArgs, layer_tensors
from ..flat import fold_layer, site_dim
from ..model import ModelWeights
from ..sites import KRON_SITES
from .config import RealConfig, kernel_supported
from .model import RealModel
from .weights import RealWeights, layer_from_tensors

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
FORMAT = "flatquant-real"
FORMAT_VERSION = 2
CONFIG_NAME = "flatquant_config.json"
DEFAULT_SHARD_BYTES = 4 * 2**30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBED_BITS = (None, 8)
_EMBED_SPEC = QuantSpec(bits=8, sym=True, granularity="per_channel")
_SHARD_NAME = re.compile(r"model-\d{5}\.safetensors")


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
    # norms (the diag scales are merged into them) and biases (the v bias is mixed by the V transform) stay fp32 in
    # every storage dtype: they are a few KB per layer, neither is bf16-representable after folding, and rounding them
    # moved a weakly calibrated W4A4KV4 model's real-path PPL from 140.1 to 104.3 on 4 windows (docs/real.md)
    out: Params = {"input_norm": folded["input_norm"].float(), "post_norm": folded["post_norm"].float()}
    out.update({e.name: folded[e.name].float() for e in LAYER_TENSORS if e.name in folded})
    for n in LINEARS:
        w = folded[f"{n}.weight"].to(torch.float64)
        if real:
            codes, scale, _ = quantize(w, qcfg.w)
            out[f"{n}.qweight"] = pack_int4(codes) if qcfg.w.bits == 4 else codes
            out[f"{n}.w_scale"] = scale.squeeze(-1).float()
        else:
            out[f"{n}.weight"] = fake_quant(w, qcfg.w).to(dtype)
        if f"{n}.bias" in folded:
            out[f"{n}.bias"] = folded[f"{n}.bias"].float()
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


def _file_record(folder: Path, path: Path) -> dict:
    """``{file, bytes, sha256}`` of a written file (flushed to disk), ``file`` relative to ``folder``."""
    fsync_path(path)
    return {"file": path.relative_to(folder).as_posix(), "bytes": path.stat().st_size, "sha256": _sha256(path)}


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
        self.shards.append(_file_record(self.out_dir, path))
        self.weight_map.update({k: name for k in self.pending})
        self.pending, self.size = {}, 0


def declared_dtype(weights: ModelWeights) -> torch.dtype:
    """The dtype a checkpoint of ``weights`` stores its embeddings in by default (norms and biases are fp32).

    The dtype the model declares (``weights.meta["dtype"]``, recorded by a loader from the HF config) when known;
    else the weights' own dtype when it is 16-bit; else bfloat16 (a model loaded in fp32 for calibration, e.g.
    a dequantized GGUF, is not stored in fp32).
    """
    named = _DTYPES.get(str((weights.meta or {}).get("dtype", "")).removeprefix("torch."))
    if named is not None:
        return named
    return weights.dtype if weights.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:  # (rows, n) -> (rows, n) int8, (rows,) fp32
    """Per-row symmetric int8 codes and fp32 scales of an embedding or LM head (``codes · scale ≈ w``).

    The scale is rounded to fp32 before the codes are taken, so :func:`dequantize_rows` is the exact inverse grid.
    """
    w64 = w.detach().to(torch.float64)
    scale, zero = qparams(w64, _EMBED_SPEC)
    scale = scale.float().double()
    codes = quantize_codes(w64, scale, zero, _EMBED_SPEC).to(torch.int8)
    return codes.contiguous(), scale.squeeze(-1).float().contiguous()


def dequantize_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:  # (rows, n), (rows,) -> (rows, n)
    """``codes · scale`` per row in ``dtype`` (computed in fp32)."""
    return (codes.float() * scale.float()[:, None]).to(dtype)


def _top_tensors(weights: ModelWeights, dtype: torch.dtype, embed_bits: int | None) -> tuple[Params, bool]:
    """``(top.* tensors, tied)``: the embedding (and an untied LM head) in ``dtype`` or int8, final norm, RoPE."""
    top = weights.top
    tied = weights.args.tie_embeddings or top["lm_head"] is top["embed"] or (
        top["lm_head"].shape == top["embed"].shape and torch.equal(top["lm_head"], top["embed"]))
    out: Params = {}
    for name in ("embed",) if tied else ("embed", "lm_head"):
        if embed_bits == 8:
            out[f"top.{name}.qweight"], out[f"top.{name}.scale"] = quantize_rows_int8(top[name])
        else:
            out[f"top.{name}"] = top[name].to(dtype).contiguous()
    out["top.final_norm"] = top["final_norm"].float().contiguous()  # fp32 like the layer norms (export_layer)
    out["top.rope.inv_freq"] = top["rope.inv_freq"].float().contiguous()
    return out, bool(tied)


def config_checksum(meta: dict) -> str:
    """sha256 of a checkpoint config's canonical JSON, without its own ``config_sha256`` entry."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_CHECKPOINT_ENTRY = re.compile(rf"{re.escape(CONFIG_NAME)}(\.tmp)?|model-\d{{5}}\.safetensors|tokenizer")


def _check_target(out_dir: Path) -> None:
    """Refuse to replace anything but a missing or empty folder or a flatquant checkpoint."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder; choose another output path")
    foreign = sorted(p.name for p in out_dir.iterdir() if not _CHECKPOINT_ENTRY.fullmatch(p.name))
    if foreign:
        raise CheckpointError(f"refusing to replace {out_dir}: it holds {foreign[:3]}, which is not part of a "
                              "flatquant checkpoint (choose a new or empty folder)")


def _remove_stale_partials(out_dir: Path) -> None:
    """Remove hidden export folders beside ``out_dir`` left by exports whose process is gone (killed)."""
    for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            log.info("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(new: Path, out_dir: Path) -> None:
    """Put the finished folder ``new`` at ``out_dir``, replacing (then deleting) what was there."""
    if not out_dir.exists():
        new.rename(out_dir)
    elif _exchange(new, out_dir):
        shutil.rmtree(new)  # now the old checkpoint
    else:  # two renames: a kill between them leaves both complete folders, the old one under .NAME.old-*
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
        new.rename(out_dir)
        shutil.rmtree(old)
    dfd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
    embed_bits: int | None = None,
    extra: dict | None = None,
) -> Path:
    """Fold calibrated transforms into ``weights`` (float64, RTN grid of the fake model) and write a checkpoint.

    Everything is written into a hidden sibling folder (``.NAME.partial-PID-XXXX``) that replaces ``out_dir``
    only when complete: an interrupted export leaves a checkpoint already at ``out_dir`` untouched.

    Args:
        weights: the original (FP) model.
        flats: per-layer flat transform parameters (from calibration or :func:`flatquant.io.load_transforms`).
        qcfg / tcfg: the bit settings and transform configuration of the calibration.
        out_dir: the checkpoint folder; an existing checkpoint there is replaced as a whole, any other
            non-empty folder is refused.
        tokenizer: saved under ``out_dir/tokenizer`` when given.
        shard_bytes: maximum shard size.
        dtype: storage dtype of the embeddings (norms and biases are always fp32); default the weights' own
            dtype (the CLI's ``--dtype auto`` uses :func:`declared_dtype`).
        embed_bits: ``None`` (embedding / LM head in ``dtype``) or 8 (per-row symmetric int8 + fp32 scale,
            dequantized at load). A tied LM head is stored once either way.
        extra: more JSON entries for the config (must not reuse the format's own keys).

    Returns:
        The path of ``flatquant_config.json``.

    Raises:
        CheckpointError: bad ``embed_bits``/``shard_bytes``/``extra``, or an ``out_dir`` that is not a checkpoint.
    """
    if embed_bits not in EMBED_BITS:
        raise CheckpointError(f"embed_bits must be None (store the embedding in the model dtype) or 8, "
                              f"not {embed_bits!r}")
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise CheckpointError(f"shard_bytes must be a positive number of bytes, not {shard_bytes!r}")
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        meta = _write_checkpoint(weights, flats, qcfg, tcfg, work, method=method, tokenizer=tokenizer,
                                 shard_bytes=shard_bytes, dtype=dtype or weights.dtype, embed_bits=embed_bits,
                                 extra=extra or {})
        _swap_in(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("wrote %s checkpoint %s (%d shard(s), %.1f MB)", meta["backend"], out_dir, len(meta["shards"]),
             sum(s["bytes"] for s in meta["shards"]) / 1e6)
    return out_dir / CONFIG_NAME


def _write_checkpoint(weights: ModelWeights, flats: list[Params], qcfg: QuantConfig, tcfg: TransformConfig,
                      out_dir: Path, *, method: str, tokenizer: object | None, shard_bytes: int, dtype: torch.dtype,
                      embed_bits: int | None, extra: dict) -> dict:
    """Write shards, tokenizer and config into the (new, empty) folder ``out_dir``; the config as written."""
    args = weights.args
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
    top, tied = _top_tensors(weights, dtype, embed_bits)
    for k, v in top.items():
        writer.add(k, v)
    writer.flush()
    tok_files: list[dict] = []
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        tok_files = [_file_record(out_dir, f) for f in sorted((out_dir / "tokenizer").rglob("*")) if f.is_file()]
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "backend": "real" if real else "fake",
        "method": method, "quant": asdict(qcfg), "transform": asdict(tcfg), "model": args.to_dict(),
        "rope_scaling": weights.rope_scaling, "dtype": _dtype_name(dtype), "tied": tied, "embed_bits": embed_bits,
        "placement": {"online_transforms": placement,
                      "description": "ln_trans before q/k/v, up_gate_trans before up/gate, down_trans before "
                                     "down_proj (Kronecker leftᵀ X right per token); o_trans mixes heads before "
                                     "o_proj; k_trans after RoPE on K (q gets k_trans_inv_t); v_trans and diag "
                                     "scales are merged into weights and norms"},
        "shards": writer.shards, "tokenizer_files": tok_files, "weight_map": writer.weight_map,
    }
    clash = sorted(set(extra) & (set(meta) | {"config_sha256"}))
    if clash:
        raise CheckpointError(f"extra config entries {clash} would overwrite the checkpoint format's own")
    meta = json.loads(json.dumps({**meta, **extra}, default=str))
    meta["config_sha256"] = config_checksum(meta)
    path = out_dir / CONFIG_NAME
    path.write_text(json.dumps(meta, indent=1))
    fsync_path(path)
    return meta


_CONFIG_TYPES: dict[str, type | tuple[type, ...]] = {
    "backend": str, "method": str, "quant": dict, "transform": dict, "model": dict, "rope_scaling": (int, float),
    "dtype": str, "tied": bool, "placement": dict, "shards": list, "tokenizer_files": list, "weight_map": dict,
    "config_sha256": str}


def _file_entries_ok(entries: object, pattern: re.Pattern | None) -> bool:
    """Whether ``entries`` is a list of ``{file, bytes, sha256}`` with safe relative names."""
    def ok(e: object) -> bool:
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("bytes"), int)
                and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64):
            return False
        if pattern is not None:
            return pattern.fullmatch(e["file"]) is not None
        parts = Path(e["file"]).parts
        return bool(parts) and parts[0] == "tokenizer" and ".." not in parts and not Path(e["file"]).is_absolute()
    return isinstance(entries, list) and all(ok(e) for e in entries)


def _check_structure(meta: dict, cpath: Path) -> None:
    """One-line refusal of a config that lacks entries or has entries of the wrong kind."""
    missing = [k for k in _CONFIG_TYPES if k not in meta] + ([] if "embed_bits" in meta else ["embed_bits"])
    wrong = [k for k, t in _CONFIG_TYPES.items() if k in meta and (not isinstance(meta[k], t) or (
        t == (int, float) and isinstance(meta[k], bool)))]
    if not (missing or wrong):
        if meta["embed_bits"] not in EMBED_BITS:
            wrong.append("embed_bits")
        if meta["backend"] not in ("real", "fake"):
            wrong.append("backend")
        ot = meta["placement"].get("online_transforms")
        if not (isinstance(ot, list) and all(isinstance(m, str) for m in ot)):
            wrong.append("placement.online_transforms")
        if not meta["shards"] or not _file_entries_ok(meta["shards"], _SHARD_NAME):
            wrong.append("shards")
        if not _file_entries_ok(meta["tokenizer_files"], None):
            wrong.append("tokenizer_files")
    if missing or wrong:
        what = "; ".join(p for p in (f"lacks {missing}" if missing else "", f"invalid {wrong}" if wrong else "") if p)
        raise CheckpointError(f"{cpath}: incomplete or damaged checkpoint config ({what}); re-export it with "
                              "`flatquant export`")


def read_config(path: Path | str) -> dict:
    """The validated JSON config of a checkpoint folder.

    Raises:
        CheckpointError: no config, invalid JSON, another format/version (v1: re-export), missing or malformed
            entries, a config edited after export (checksum), or an unsupported architecture.
    """
    folder = Path(path)
    cpath = folder / CONFIG_NAME if folder.is_dir() else folder
    if not cpath.is_file():
        raise CheckpointError(f"{path} is not a flatquant checkpoint (no {CONFIG_NAME}; export one with "
                              "`flatquant export`)")
    meta = read_format_json(cpath, FORMAT, CheckpointError)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{cpath}: checkpoint format v{version}, this flatquant reads v{FORMAT_VERSION} only; "
                              "re-export it with `flatquant export --transforms RUN_DIR --out CKPT`")
    _check_structure(meta, cpath)
    if config_checksum(meta) != meta["config_sha256"]:
        raise CheckpointError(f"{cpath}: config checksum mismatch (the config was edited after export); "
                              "re-export the checkpoint with `flatquant export`")
    try:
        meta["args"] = ModelArgs(**meta["model"])
        meta["qcfg"] = quant_config_from_dict(meta["quant"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cpath}: unsupported or invalid model/quantization description: {e}") from None
    if meta["dtype"] not in _DTYPES:
        raise CheckpointError(f"{cpath}: unknown dtype {meta['dtype']!r}")
    return meta


def expected_shapes(args: ModelArgs, qcfg: QuantConfig, backend: str, placement: list[str], *,
                    tied: bool | None = None, embed_bits: int | None = None) -> dict[str, tuple]:
    """``name -> shape`` of every tensor a checkpoint for ``args`` must hold (placement = its online transforms).

    Args:
        tied: the LM head is the embedding (stored once); default ``args.tie_embeddings``.
        embed_bits: ``None`` (float embedding / LM head) or 8 (``.qweight`` int8 codes and ``.scale`` per row).
    """
    tied = args.tie_embeddings if tied is None else tied
    shapes: dict[str, tuple] = {"top.final_norm": (args.hidden,), "top.rope.inv_freq": (args.head_dim // 2,)}
    for name in ("embed",) if tied else ("embed", "lm_head"):
        if embed_bits == 8:
            shapes[f"top.{name}.qweight"], shapes[f"top.{name}.scale"] = (args.vocab_size, args.hidden), \
                (args.vocab_size,)
        else:
            shapes[f"top.{name}"] = (args.vocab_size, args.hidden)
    mats = {"o_trans": (args.n_heads, args.n_heads), "k_trans": (args.head_dim, args.head_dim),
            "k_trans_inv_t": (args.head_dim, args.head_dim)}
    for site in KRON_SITES:
        n1, n2 = decompose_dim(site_dim(site, args))
        mats[f"{site}.left"], mats[f"{site}.right"] = (n1, n1), (n2, n2)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "input_norm"] = shapes[p + "post_norm"] = (args.hidden,)
        shapes.update({p + e.name: e.shape(args) for e in layer_tensors(args)})
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


def verify_files(folder: Path, entries: list[dict], what: str = "shard") -> None:
    """Check the presence, size and sha256 of files recorded in a config (shards or tokenizer files).

    Raises:
        CheckpointError: a missing, truncated or modified file.
    """
    for s in entries:
        f = folder / s["file"]
        if not f.is_file():
            raise CheckpointError(f"{folder}: {what} {s['file']} is missing")
        size = f.stat().st_size
        if size != s["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the config records {s['bytes']} (truncated or replaced)")
        if _sha256(f) != s["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch (the file was modified after export)")


def verify_shards(folder: Path, meta: dict) -> None:
    """Check every shard's presence, size and sha256 against the config.

    Raises:
        CheckpointError: a missing, truncated or modified shard.
    """
    verify_files(folder, meta["shards"])


def load_tensors(path: Path | str, *, device: torch.device | str = "cpu", verify: bool = True,
                 expect: ModelArgs | None = None) -> tuple[dict, Params]:
    """``(config, tensors)`` of a checkpoint, validated (checksums, architecture, tensor names and shapes).

    Args:
        verify: check the shards' sizes and sha256 (the config's own checksum is always checked).
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
    want = expected_shapes(args, meta["qcfg"], meta["backend"], meta["placement"]["online_transforms"],
                           tied=meta["tied"], embed_bits=meta["embed_bits"])
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


def _top_weight(t: Params, name: str, embed_bits: int | None, dtype: torch.dtype) -> Tensor:
    """``top.{name}`` in ``dtype``, dequantized from int8 codes when ``embed_bits`` is 8."""
    if embed_bits == 8:
        codes = t[f"top.{name}.qweight"]
        if codes.dtype != torch.int8:
            raise CheckpointError(f"top.{name}.qweight is {codes.dtype}, not int8")
        return dequantize_rows(codes, t[f"top.{name}.scale"], dtype)
    return t[f"top.{name}"].to(dtype)


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu", *, dtype: torch.dtype | None = None,
                    verify: bool = True, expect: ModelArgs | None = None,
                    compile_decode: bool | None = None, compile_prefill: bool | None = None) -> RealModel:
    """Load a checkpoint into a :class:`RealModel` (reference ops on CPU, Triton kernels on CUDA).

    Args:
        dtype: compute dtype; default fp32 on CPU, and on CUDA the checkpoint's dtype when it is 16-bit, else bf16.
        verify: check the shards' sizes and sha256 first.
        compile_decode, compile_prefill: ``torch.compile`` the decode / prefill layer (None: on CUDA only; see
            :class:`RealModel`).

    Raises:
        CheckpointError: see :func:`load_tensors`.
    """
    device = torch.device(device)
    meta, t = load_tensors(path, device=device, verify=verify, expect=expect)
    ck_dtype = _DTYPES[meta["dtype"]]
    if dtype is None:
        dtype = torch.float32 if device.type != "cuda" else (
            ck_dtype if ck_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
    args: ModelArgs = meta["args"]
    cfg = RealConfig(args=args, qcfg=meta["qcfg"], dtype=dtype, rope_scaling=float(meta["rope_scaling"]),
                     real_linears=meta["backend"] == "real")
    if not cfg.real_linears:
        log.warning("%s: bit setting %s is not implemented by the integer kernels; running the fake path",
                    path, cfg.qcfg.tag)
    layers = []
    for i in range(args.n_layers):
        pre = f"layers.{i}."
        layers.append(layer_from_tensors({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}, cfg))
    embed = _top_weight(t, "embed", meta["embed_bits"], dtype)
    lm_head = embed if meta["tied"] else _top_weight(t, "lm_head", meta["embed_bits"], dtype)
    top = {"embed": embed, "final_norm": t["top.final_norm"].to(dtype), "lm_head": lm_head,
           "rope.inv_freq": t["top.rope.inv_freq"]}
    return RealModel(RealWeights(cfg=cfg, top=top, layers=tuple(layers)), compile_decode=compile_decode,
                     compile_prefill=compile_prefill)


def load_tokenizer(path: Path | str, *, verify: bool = True) -> object:
    """The tokenizer saved with a checkpoint (its files checked against the config's sha256 first).

    Raises:
        CheckpointError: the checkpoint has no tokenizer, or its files differ from the exported ones.
    """
    tdir = Path(path) / "tokenizer"
    if not tdir.is_dir():
        raise CheckpointError(f"{path} holds no tokenizer (export with a model that has one, or pass --model)")
    if verify:
        verify_files(Path(path), read_config(path)["tokenizer_files"], "tokenizer file")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tdir))
