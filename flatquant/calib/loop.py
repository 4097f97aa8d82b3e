"""The layer-wise calibration loop (spec §3.3): FP targets, FP inputs, functional AdamW per layer.

Every finished layer is written atomically to ``workdir/layers/layer_XXX.safetensors`` with a fingerprint
of model, data and settings, so an interrupted run resumes at the first unfinished layer and ends
bit-identical to an uninterrupted one (each layer's randomness comes from its own generator). The same
property lets :func:`calibrate_layers` train any subset of layers (one process's block in
:mod:`flatquant.calib.distributed`) with the result of a whole-model run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..core.spec import QuantConfig, TransformConfig
from ..models.flat import cast_folded, fold_layer, init_flat_params, is_clip_key
from ..models.layer import Rope, fp_forward_with_absmax, layer_forward
from ..models.model import ModelWeights, embed, rope_for
from .config import CalibConfig
from .graph import capturable_linalg, deterministic_kernels, try_capture
from .guard import check_layer_finite
from .methods import needs_data
from .optim import adamw_apply, schedule
from .workdir import atomic_save_file, atomic_write_text, layer_ckpt, load_layer, workdir_lock

log = logging.getLogger(__name__)
Params = dict[str, Tensor]


class CalibrationMismatch(ValueError):
    """A work directory that holds progress of a different calibration."""


def fingerprint(weights: ModelWeights, tokens: Tensor | None, qcfg: QuantConfig, tcfg: TransformConfig,
                ccfg: CalibConfig) -> str:
    """Hash of everything that determines the calibration result."""
    h = hashlib.sha256()
    h.update(json.dumps([weights.args.to_dict(), asdict(qcfg), asdict(tcfg), calibration_settings(ccfg)],
                        sort_keys=True, default=str).encode())
    if tokens is not None:
        h.update(tokens.to(torch.int64).cpu().numpy().tobytes())
    h.update(weights.layers[0]["q_proj.weight"].float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:24]


#: settings that do not change the learned transforms (the weight quantizer runs after calibration)
POST_CALIBRATION_FIELDS = ("weight_quantizer", "gptq_percdamp", "gptq_blocksize", "gptq_act_order", "compile",
                           "cuda_graph", "recompute", "deterministic")


def calibration_settings(ccfg: CalibConfig) -> dict[str, object]:
    """The settings that determine the learned transforms (RTN and GPTQ rows share one calibration)."""
    return {k: v for k, v in ccfg.to_dict().items() if k not in POST_CALIBRATION_FIELDS}


def resolve_amp(ccfg: CalibConfig, device: torch.device) -> torch.dtype:
    """The training-forward dtype: ``auto`` is bfloat16 on CUDA and float32 elsewhere."""
    if ccfg.amp_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, ccfg.amp_dtype)


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """The RNG of one layer's initialisation and batch order (independent of resume)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def layer_loss(
    trainable: Params, fixed: Params, frozen: Params, x: Tensor, y: Tensor, rope: Rope,
    args, qcfg: QuantConfig, kind: str, amp: torch.dtype, normalize: bool = True, recompute: bool = True,
) -> tuple[Tensor, Tensor]:
    """Calibration loss of one batch: MSE between the fake-quant layer and the FP target.

    Returns ``(loss, mse.detach())`` with ``loss = mse / mse.detach()`` when ``normalize`` (the
    official normalisation: the gradient of log-MSE, which keeps fp16 gradients in range without a
    GradScaler), else ``loss = mse``. ``recompute`` refolds each weight and re-runs each activation
    quantizer in backward instead of keeping their intermediates (see :func:`fold_layer`, :func:`quant_act`).
    """
    folded = fold_layer({**fixed, **trainable}, frozen, args, qcfg, kind, recompute=recompute)
    ctx = (torch.autocast(x.device.type, dtype=amp, cache_enabled=False) if amp != torch.float32
           else contextlib.nullcontext())
    with ctx:
        out = layer_forward(folded, x, rope, args, qcfg, recompute=recompute)
    mse = F.mse_loss(out.float(), y.float())
    return (mse / mse.detach() if normalize else mse), mse.detach()


@torch.no_grad()
def fp_layer_pass(frozen: Params, inps: Tensor, rope: Rope, args, batch: int, *, want_stats: bool):
    """FP outputs of one layer over all samples, and per-site activation maxima if requested."""
    outs = torch.empty_like(inps)
    stats: dict[str, Tensor] = {}
    for s in range(0, inps.shape[0], batch):
        xb = inps[s:s + batch].float()
        if want_stats:
            out, batch_stats = fp_forward_with_absmax(frozen, xb, rope, args)
            for k, v in batch_stats.items():
                stats[k] = torch.maximum(stats[k], v) if k in stats else v
        else:
            out = layer_forward(frozen, xb, rope, args, QuantConfig())
        outs[s:s + batch] = out.to(outs.dtype)
    return outs, stats


GradFn = tuple[Callable, bool]


def make_grad_fn(ccfg: CalibConfig, device: torch.device | str) -> GradFn:
    """Gradient-and-value function of :func:`layer_loss`, compiled per ``ccfg.compile``, and whether it
    recomputes quantizer intermediates in backward (``ccfg.recompute``; never when compiled: inductor plans
    what backward keeps itself, and mis-traces the recompute function).

    Measured on one LLaMA-3-8B layer on the H100 (``bench/results/calib_llama3-8b_15ep_*.json``): compiled,
    44 ms per step and a 13.1 GiB peak; eager, 138 ms and 35.0 GiB; eager with recompute was slower still and
    did not lower the peak, so ``recompute='auto'`` means off.
    """
    cuda = torch.device(device).type == "cuda"
    compiled = ccfg.compile == "on" or (ccfg.compile == "auto" and cuda)
    fn = torch.func.grad_and_value(layer_loss, has_aux=True)
    if compiled:
        fn = torch.compile(fn, dynamic=False)
    return fn, not compiled and ccfg.recompute == "on"


def train_layer(
    trainable: Params, fixed: Params, frozen: Params, inps: Tensor, targets: Tensor, rope: Rope,
    args, qcfg: QuantConfig, tcfg: TransformConfig, ccfg: CalibConfig, *, generator: torch.Generator,
    amp: torch.dtype, desc: str = "",
    on_capture: Callable[[bool], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    step_fn: GradFn | None = None,
) -> tuple[Params, list[float]]:
    """Optimise one layer's trainable parameters; returns them and the mean MSE of each epoch.

    On CUDA the step is captured as a CUDA graph after the first (eager) step (``ccfg.cuda_graph``);
    ``on_capture(ok)`` hears whether the capture was used (a caller stops retrying after a failure);
    ``on_epoch(epoch, mean_mse)`` is called after each epoch (the device is synchronised then, so it can time it).
    ``step_fn`` (from :func:`make_grad_fn`) lets layers of one model share one compiled gradient function, so
    ``torch.compile`` runs once per model instead of once per layer.
    """
    if step_fn is None:
        step_fn = make_grad_fn(ccfg, inps.device)
    grad_fn, recompute = step_fn
    clip = {k: is_clip_key(k) for k in trainable}

    def step(p: Params, m: Params, v: Params, x: Tensor, y: Tensor, sc: Tensor,
             ) -> tuple[Params, Params, Params, Tensor]:
        grads, (_, mse) = grad_fn(p, fixed, frozen, x, y, rope, args, qcfg, tcfg.kind, amp, ccfg.normalize_loss,
                                  recompute=recompute)
        lrs = {k: sc[1] if clip[k] else sc[0] for k in p}
        p, m, v = adamw_apply(p, grads, m, v, lrs, sc[2], sc[3], ccfg)  # sc: (lr, clip lr, 1-β1^t, 1-β2^t)
        return p, m, v, mse

    use_graph = _use_cuda_graph(ccfg, inps.device)
    sched = schedule(ccfg.epochs * ccfg.steps_per_epoch, ccfg, inps.device)
    m = {k: torch.zeros_like(t) for k, t in trainable.items()}
    v = {k: torch.zeros_like(t) for k, t in trainable.items()}
    captured = None
    losses = []
    step_i = 0
    # cuSOLVER LU: no host syncs (and capturable); deterministic kernels: the same transforms on every run
    with capturable_linalg(inps.device), deterministic_kernels(ccfg.deterministic):
        for epoch in tqdm(range(ccfg.epochs), desc=desc, leave=False, disable=None):
            order = (torch.randperm(ccfg.steps_per_epoch, generator=generator) if ccfg.shuffle
                     else torch.arange(ccfg.steps_per_epoch))
            tot = torch.zeros((), device=inps.device)
            for j in order.tolist():
                sl = slice(j * ccfg.batch_size, (j + 1) * ccfg.batch_size)
                if captured is not None:
                    tot = tot + captured.run(inps[sl], targets[sl], sched[step_i])
                else:
                    x = inps[sl].float()
                    before = (trainable, m, v)
                    trainable, m, v, mse = step(trainable, m, v, x, targets[sl], sched[step_i])
                    tot = tot + mse
                    if use_graph and step_i == 0:
                        captured = try_capture(step, before, (trainable, m, v), x, targets[sl], sched[step_i])
                        if on_capture is not None:
                            on_capture(captured is not None)
                step_i += 1
            losses.append(float(tot) / ccfg.steps_per_epoch)
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
            log.debug("%s epoch %d mse %.6g", desc, epoch, losses[-1])
    if captured is not None:
        trainable = {k: t.clone() for k, t in captured.params.items()}
    return trainable, losses


def _use_cuda_graph(ccfg: CalibConfig, device: torch.device) -> bool:
    """Whether to capture the step: ``auto`` on CUDA."""
    if ccfg.cuda_graph == "off" or ccfg.steps_per_epoch * ccfg.epochs < 2:
        return False
    if device.type != "cuda":
        if ccfg.cuda_graph == "on":
            raise ValueError("cuda_graph='on' needs a CUDA device; use 'auto' or 'off'")
        return False
    return True


def _check_workdir(workdir: Path, fp: str, manifest: dict) -> None:
    """Refuse a work directory holding another calibration's progress; record this one's manifest."""
    man = workdir / "calibration.json"
    if man.is_file():
        try:
            old = json.loads(man.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = None
            log.warning("%s is damaged; rewriting it", man)
        if old is not None and old != fp:
            raise CalibrationMismatch(
                f"{workdir} holds progress of a different calibration (model, data or settings differ); "
                "use another output directory or delete it")
    atomic_write_text(man, json.dumps({"fingerprint": fp, **manifest}, indent=1, default=str))


def calibrate(
    weights: ModelWeights,
    calib_tokens: Tensor | None,  # (nsamples, seqlen) int64, or None for data-free methods
    qcfg: QuantConfig,
    tcfg: TransformConfig,
    ccfg: CalibConfig,
    *,
    device: torch.device | str = "cpu",
    workdir: Path | None = None,
) -> list[Params]:
    """Calibrate every layer; returns each layer's flat parameters (trainable and fixed, on CPU, fp32).

    Every layer sees the FP output of the previous layer as input and its own FP output as
    target, so quantization error does not propagate between layers during calibration.
    ``workdir`` (locked for the duration, see :mod:`flatquant.calib.workdir`) keeps one checkpoint per
    finished layer; a rerun resumes from them.
    """
    done = calibrate_layers(weights, calib_tokens, qcfg, tcfg, ccfg, layers=range(weights.args.n_layers),
                            device=device, workdir=workdir)
    return [done[i].params for i in range(weights.args.n_layers)]


@dataclass(frozen=True)
class LayerResult:
    """One calibrated layer: its flat parameters and where they came from.

    Attributes:
        params: trainable and fixed parameters (CPU, fp32).
        rank: the process rank that trained it (as recorded in its checkpoint when resumed).
        world_size: the number of processes of the run that trained it.
        resumed: loaded from a checkpoint of an earlier run instead of trained now.
    """

    params: Params
    rank: int = 0
    world_size: int = 1
    resumed: bool = False


def finished_layers(workdir: Path | None, fp: str, layers: Sequence[int]) -> dict[int, LayerResult]:
    """Those of ``layers`` with a valid checkpoint of calibration ``fp`` in ``workdir`` (damaged ones are
    reported in one line each)."""
    if workdir is None:
        return {}
    out = {}
    for i in layers:
        got = load_layer(layer_ckpt(Path(workdir), i), fp)
        if got is not None:
            flat, meta = got
            out[i] = LayerResult(flat, int(meta.get("rank", 0)), int(meta.get("world_size", 1)), resumed=True)
    return out


def calibrate_layers(
    weights: ModelWeights,
    calib_tokens: Tensor | None,  # (nsamples, seqlen) int64, or None for data-free methods
    qcfg: QuantConfig,
    tcfg: TransformConfig,
    ccfg: CalibConfig,
    *,
    layers: Sequence[int],
    device: torch.device | str = "cpu",
    workdir: Path | None = None,
    lock: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> dict[int, LayerResult]:
    """Calibrate the given layers (any subset, e.g. one process's block); returns them by index.

    The FP inputs of the first requested layer are recomputed by FP forwards through every earlier layer,
    exactly as a whole-model run computes them, and each layer draws its randomness from its own generator
    (:func:`layer_generator`), so a layer's result does not depend on which process or run calibrates it.
    Layers with a valid checkpoint in ``workdir`` are loaded, not trained; a damaged or foreign one is
    reported and recomputed. ``lock=False`` when the caller manages the work directory: it holds the lock,
    has checked the manifest and passes only layers without a valid checkpoint (rank 0 of a layer-parallel
    run does this for all ranks); ``rank``/``world_size`` are recorded in each checkpoint.
    """
    device = torch.device(device)
    args = weights.args
    todo = sorted(set(layers))
    if todo and not 0 <= todo[0] <= todo[-1] < args.n_layers:
        raise ValueError(f"layers {todo} outside 0..{args.n_layers - 1}")
    if not needs_data(tcfg):
        return {i: LayerResult({**t, **f}, rank, world_size)
                for i, (t, f) in ((i, init_flat_params(weights.layers[i], args, qcfg, tcfg, absmax=None,
                                                       generator=layer_generator(ccfg.seed, i))) for i in todo)}
    if calib_tokens is None:
        raise ValueError("this method needs calibration data")
    if not todo:
        return {}
    fp = fingerprint(weights, calib_tokens, qcfg, tcfg, ccfg)
    with contextlib.ExitStack() as stack:
        if workdir is not None:
            workdir = Path(workdir)
            if lock:
                stack.enter_context(workdir_lock(workdir))
                _check_workdir(workdir, fp, {"quant": asdict(qcfg), "transform": asdict(tcfg),
                                             "calib": ccfg.to_dict()})
        results = finished_layers(workdir, fp, todo) if lock else {}
        for i in results:
            log.info("layer %d: resumed from %s", i, layer_ckpt(workdir, i))
        pending = [i for i in todo if i not in results]
        if pending:
            results.update(_train_layers(weights, calib_tokens, qcfg, tcfg, ccfg, pending, device, workdir, fp,
                                         rank, world_size))
    return results


def _train_layers(
    weights: ModelWeights, calib_tokens: Tensor, qcfg: QuantConfig, tcfg: TransformConfig, ccfg: CalibConfig,
    pending: list[int], device: torch.device, workdir: Path | None, fp: str, rank: int, world_size: int,
) -> dict[int, LayerResult]:
    """FP forwards up to ``pending[0]``, then train (or FP-forward through) each layer up to ``pending[-1]``."""
    args = weights.args
    amp = resolve_amp(ccfg, device)
    buf_dtype = torch.float32 if amp == torch.float32 else amp
    with torch.no_grad():
        inps = torch.cat([embed(weights, calib_tokens[s:s + 8].to(weights.device)).to(device, buf_dtype)
                          for s in range(0, calib_tokens.shape[0], 8)])
    rope = rope_for(weights, calib_tokens.shape[1], device)
    results: dict[int, LayerResult] = {}
    captures: list[bool] = []
    step_fn = make_grad_fn(ccfg, device)  # one (compiled) gradient function for every layer
    t_fwd = time.time()
    for i in tqdm(range(pending[0]), desc="FP inputs", disable=None if pending[0] else True):
        frozen = {k: v.to(device=device, dtype=torch.float32) for k, v in weights.layers[i].items()}
        inps, _ = fp_layer_pass(frozen, inps, rope, args, ccfg.batch_size, want_stats=False)
    if pending[0]:
        log.info("FP inputs of layer %d: FP passes through %d layers in %.1fs", pending[0], pending[0],
                 time.time() - t_fwd)
    bar = tqdm(range(pending[0], pending[-1] + 1), desc="calibrating layers", disable=None)
    for i in bar:
        frozen = {k: v.to(device=device, dtype=torch.float32) for k, v in weights.layers[i].items()}
        t0 = time.time()
        train = i in pending
        want = train and tcfg.add_diag and tcfg.diag_init == "smoothquant"
        outs, stats = fp_layer_pass(frozen, inps, rope, args, ccfg.batch_size, want_stats=want)
        if train:
            gen = layer_generator(ccfg.seed, i)
            trainable, fixed = init_flat_params(frozen, args, qcfg, tcfg, absmax=stats, generator=gen)
            trainable = {k: v.to(device) for k, v in trainable.items()}
            fixed = {k: v.to(device) for k, v in fixed.items()}
            losses: list[float] = []
            if trainable and ccfg.epochs > 0:
                local = replace(ccfg, cuda_graph="off") if False in captures else ccfg  # a failed capture leaks
                trainable, losses = train_layer(trainable, fixed, frozen, inps, outs, rope, args, qcfg, tcfg, local,
                                                generator=gen, amp=amp, desc=f"layer {i}",
                                                on_capture=captures.append, step_fn=step_fn)
            flat = {k: v.detach().float().cpu().contiguous() for k, v in {**trainable, **fixed}.items()}
            check_layer_finite(i, losses, flat)  # a NaN/inf layer is an error, never a checkpoint
            if workdir is not None:
                atomic_save_file(flat, layer_ckpt(workdir, i), metadata={
                    "fingerprint": fp, "losses": json.dumps(losses), "rank": str(rank),
                    "world_size": str(world_size)})
            results[i] = LayerResult(flat, rank, world_size)
            if losses:
                bar.set_postfix(first=f"{losses[0]:.3g}", last=f"{losses[-1]:.3g}")
                log.info("layer %d: mse %.4g -> %.4g in %.1fs", i, losses[0], losses[-1], time.time() - t0)
        inps = outs
        del frozen
    return results


def reparameterize(
    weights: ModelWeights, flats: list[Params], qcfg: QuantConfig, tcfg: TransformConfig,
    *, quantize_weights: bool = True,
) -> ModelWeights:
    """Fold every layer's transforms into its weights in float64 (spec §3.7) and RTN-quantize them.

    Returns a model whose layer dicts are in folded form, in the model's dtype.
    """
    layers = []
    for frozen, flat in zip(weights.layers, flats, strict=True):
        f64 = {k: v.to(torch.float64) for k, v in frozen.items()}
        folded = fold_layer({k: v.to(torch.float64) for k, v in flat.items()}, f64, weights.args, qcfg, tcfg.kind,
                            quantize_weights=quantize_weights)
        layers.append(cast_folded(folded, frozen["input_norm"].dtype))
    return weights.with_layers(layers)
