"""Saving and loading calibrated transforms: safetensors for tensors, JSON for what they belong to."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .calib.config import CalibConfig
from .calib.workdir import atomic_save_file, atomic_write_text
from .core.spec import QuantConfig, QuantSpec, TransformConfig
from .models.args import ModelArgs

FORMAT = "flatquant-transforms"
FORMAT_VERSION = 1


class TransformFileError(ValueError):
    """A transform file that is missing, malformed, or made for another model or config."""


def save_transforms(
    out_dir: Path, flats: list[dict[str, Tensor]], *, args: ModelArgs, qcfg: QuantConfig, tcfg: TransformConfig,
    ccfg: CalibConfig | None, method: str, extra: dict | None = None,
) -> Path:
    """Write ``transforms.safetensors`` and ``transforms.json`` into ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.{k}": v.detach().cpu().contiguous() for i, f in enumerate(flats) for k, v in f.items()}
    # Both files are written atomically (temporary file, then rename), the JSON last: a kill leaves either the old
    # pair or a complete new one, never a truncated file.
    atomic_save_file(tensors, out_dir / "transforms.safetensors", metadata={"format": FORMAT})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "model": args.to_dict(),
            "quant": asdict(qcfg), "transform": asdict(tcfg), "calib": ccfg.to_dict() if ccfg else None,
            **(extra or {})}
    path = out_dir / "transforms.json"
    atomic_write_text(path, json.dumps(meta, indent=1, default=str))
    return path


def quant_config_from_dict(d: dict) -> QuantConfig:
    """Inverse of ``asdict(QuantConfig)``."""
    return QuantConfig(**{k: QuantSpec(**v) for k, v in d.items()})


def read_format_json(path: Path, fmt: str, error: type[Exception]) -> dict:
    """A JSON object whose ``format`` entry is ``fmt`` (the version is the caller's to check).

    Raises:
        error: unreadable or invalid JSON, not an object, or another format, in one line naming ``path``.
    """
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{path}: not a {fmt} file")
    return meta


def load_transforms(path: Path, args: ModelArgs) -> tuple[list[dict[str, Tensor]], QuantConfig, TransformConfig, dict]:
    """Load a transform file (its folder or its .json/.safetensors) calibrated for a model with ``args``.

    Raises:
        TransformFileError: missing files, another format, or another model's shapes.
    """
    path = Path(path)
    if not path.exists():
        raise TransformFileError(f"transform path {path} does not exist (no transforms.json there)")
    folder = path if path.is_dir() else path.parent
    jpath, tpath = folder / "transforms.json", folder / "transforms.safetensors"
    if not jpath.is_file() or not tpath.is_file():
        raise TransformFileError(f"no transforms.json + transforms.safetensors in {folder}")
    meta = read_format_json(jpath, FORMAT, TransformFileError)
    if meta.get("format_version") != FORMAT_VERSION:
        raise TransformFileError(f"{jpath} is not a {FORMAT} v{FORMAT_VERSION} file")
    theirs = meta["model"]
    ours = args.to_dict()
    diff = [f"{k}={theirs.get(k)} (model has {ours[k]})" for k in ("arch", "hidden", "intermediate", "n_layers",
                                                                     "n_heads", "n_kv_heads", "head_dim", "vocab_size")
            if theirs.get(k) != ours[k]]
    if diff:
        raise TransformFileError(f"{folder} was calibrated for another model: " + ", ".join(diff))
    try:
        flat = load_file(str(tpath))
    except (SafetensorError, OSError) as e:
        raise TransformFileError(f"{tpath} is damaged or truncated ({e}); calibrate again") from None
    bad = [k for k, v in flat.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TransformFileError(f"{tpath} holds NaN/inf in {len(bad)} tensor(s), e.g. {bad[0]!r}; calibrate again")
    flats: list[dict[str, Tensor]] = [{} for _ in range(args.n_layers)]
    for k, v in flat.items():
        _, i, name = k.split(".", 2)
        flats[int(i)][name] = v.to(torch.float32)
    return flats, quant_config_from_dict(meta["quant"]), TransformConfig(**meta["transform"]), meta
