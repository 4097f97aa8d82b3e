"""Data-parallel calibration with ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Every process holds the whole model (on CPU; one layer at a time on its device) and the same
calibration windows. Each optimizer step's batch ``j`` (samples ``[j·B, (j+1)·B)``) is split
evenly: rank ``r`` of ``W`` computes samples ``[j·B + r·B/W, j·B + (r+1)·B/W)``. The un-normalised
gradients and MSE are all-reduced (mean) before the loss normalisation and the AdamW step, and the
per-channel activation maxima of the SmoothQuant diag init are all-reduced (max), so every process
takes the same steps and ends with the same transforms as one process with batch ``B`` (up to the
floating-point order of the reductions). Only rank 0 writes the work directory.

Use :func:`calibrate_distributed` inside an initialised process group (``torchrun`` or your own
launcher); :func:`launch_cpu` spawns a local gloo group of CPU processes (tests, CPU-only machines).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..core.spec import QuantConfig, TransformConfig
from ..models.model import ModelWeights
from .config import CalibConfig
from .loop import CalibrationMismatch, calibrate, fingerprint, needs_data

log = logging.getLogger(__name__)
Params = dict[str, Tensor]


def shard_tokens(
    tokens: Tensor,  # (nsamples, seqlen)
    batch_size: int,
    rank: int,
    world_size: int,
) -> Tensor:  # (nsamples / world_size, seqlen)
    """This rank's share of every batch, in batch order.

    Batch ``j`` is rows ``[j·B, (j+1)·B)``; rank ``r`` keeps rows ``[j·B + r·B/W, j·B + (r+1)·B/W)``,
    so step ``j`` of the rank's local loop (batch ``B/W``) sees its slice of global batch ``j``.

    Raises:
        ValueError: ``B`` not divisible by ``W``, or ``nsamples`` not a multiple of ``B``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if batch_size % world_size:
        raise ValueError(f"calibration batch size {batch_size} is not divisible by the number of processes "
                         f"{world_size}; choose a batch size that is a multiple of {world_size}")
    n = tokens.shape[0]
    if n % batch_size:
        raise ValueError(f"{n} calibration windows are not a multiple of the batch size {batch_size}")
    per = batch_size // world_size
    idx = torch.arange(n).view(n // batch_size, batch_size)[:, rank * per:(rank + 1) * per].reshape(-1)
    return tokens[idx]


def all_reduce_mean_grads(grads: Params, mse: Tensor) -> tuple[Params, Tensor]:
    """All-reduce (mean over ranks) of un-normalised gradients and the batch MSE, in one flat buffer.

    Ranks hold equally sized shards, so the mean of their mean-MSEs (and of their gradients) is the
    MSE (gradient) of the whole batch.
    """
    world = dist.get_world_size()
    keys = list(grads)
    flat = torch.cat([grads[k].reshape(-1).float() for k in keys] + [mse.reshape(1).float()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    out: Params = {}
    off = 0
    for k in keys:
        g = grads[k]
        out[k] = flat[off:off + g.numel()].view(g.shape).to(g.dtype)
        off += g.numel()
    return out, flat[off].to(mse.dtype)


def all_reduce_max_stats(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """All-reduce (max over ranks) of per-channel activation maxima ``{site: (n,)}``."""
    keys = sorted(stats)
    flat = torch.cat([stats[k].reshape(-1).float() for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    out, off = {}, 0
    for k in keys:
        n = stats[k].numel()
        out[k] = flat[off:off + n].view(stats[k].shape).to(stats[k].dtype)
        off += n
    return out


def _ckpt(workdir: Path, i: int) -> Path:
    return workdir / "layers" / f"layer_{i:03d}.safetensors"


def _resume_plan(workdir: Path | None, fp: str, n_layers: int) -> tuple[str | None, dict[int, Params]]:
    """On rank 0: an error message (another calibration's workdir) or the finished layers' tensors."""
    if workdir is None:
        return None, {}
    import json

    man = workdir / "calibration.json"
    if man.is_file() and json.loads(man.read_text()).get("fingerprint") != fp:
        return (f"{workdir} holds progress of a different calibration (model, data, settings or number of "
                "processes differ); use another output directory or delete it"), {}
    done = {i: load_file(str(_ckpt(workdir, i))) for i in range(n_layers) if _ckpt(workdir, i).is_file()}
    return None, done


def _broadcast(obj: Any, device: torch.device) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def calibrate_distributed(
    weights: ModelWeights,
    calib_tokens: Tensor | None,  # (nsamples, seqlen) int64, the same full set on every rank
    qcfg: QuantConfig,
    tcfg: TransformConfig,
    ccfg: CalibConfig,
    *,
    device: torch.device | str,
    workdir: Path | None = None,
) -> list[Params]:
    """Data-parallel :func:`flatquant.calib.loop.calibrate` inside an initialised process group.

    Every rank passes the same arguments (the full ``calib_tokens``); each calibrates on its shard
    (:func:`shard_tokens`) with batch ``ccfg.batch_size / world_size`` and reduced gradients, and all
    ranks return the same per-layer flat parameters. Only rank 0 writes ``workdir``; a resumed run
    (same world size) loads the finished layers on rank 0 and broadcasts them to the others.

    Args:
        device: this rank's device (``cuda:<local_rank>`` with NCCL, ``cpu`` with gloo).
        workdir: per-layer checkpoints for resume (rank 0 only).

    Returns:
        One flat parameter dict per layer (CPU, fp32), identical on every rank.

    Raises:
        RuntimeError: no initialised process group.
        ValueError: ``ccfg.batch_size`` not divisible by the world size.
        CalibrationMismatch: ``workdir`` holds another calibration (raised on every rank).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("calibrate_distributed needs an initialised torch.distributed process group")
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if calib_tokens is None or not needs_data(tcfg):
        # data-free: every rank computes the same deterministic transforms; nothing to share
        return calibrate(weights, calib_tokens, qcfg, tcfg, ccfg, device=device,
                         workdir=Path(workdir) if workdir is not None and rank == 0 else None)
    if calib_tokens.shape[0] != ccfg.nsamples:
        raise ValueError(f"got {calib_tokens.shape[0]} calibration windows, config says nsamples={ccfg.nsamples}")
    shard = shard_tokens(calib_tokens, ccfg.batch_size, rank, world)
    workdir = Path(workdir) if workdir is not None else None
    plan = _resume_plan(workdir, fingerprint(weights, shard, qcfg, tcfg, ccfg), weights.args.n_layers) \
        if rank == 0 else None
    err, done = _broadcast(plan, device)
    if err is not None:
        raise CalibrationMismatch(err)
    if done:
        log.info("rank %d: resuming with %d finished layers", rank, len(done))
    kw = dict(device=device, grad_reduce=all_reduce_mean_grads, stats_reduce=all_reduce_max_stats,
              batch_size=ccfg.batch_size // world)
    if rank == 0:
        return calibrate(weights, shard, qcfg, tcfg, ccfg, workdir=workdir, **kw)
    if not done:
        return calibrate(weights, shard, qcfg, tcfg, ccfg, workdir=None, **kw)
    # other ranks skip exactly the layers rank 0 skips: a private scratch workdir holding them
    with tempfile.TemporaryDirectory(prefix=f"flatquant-rank{rank}-") as tmp:
        for i, flat in done.items():
            _ckpt(Path(tmp), i).parent.mkdir(parents=True, exist_ok=True)
            save_file(flat, str(_ckpt(Path(tmp), i)))
        return calibrate(weights, shard, qcfg, tcfg, ccfg, workdir=Path(tmp), **kw)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable[..., Any], world: int, port: int, threads: int, out_dir: str,
            args: tuple[Any, ...]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(*args)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def launch_cpu(fn: Callable[..., Any], world_size: int, *args: Any, threads: int | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` spawned CPU processes joined in a gloo group.

    ``fn`` must be picklable (a module-level function); inside it the process group is initialised
    (``dist.get_rank()``). Each process uses ``threads`` intra-op threads (default: the CPU count
    divided among the processes). Returns every rank's return value, in rank order.
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="flatquant-dist-") as out_dir:
        mp.spawn(_worker, args=(fn, world_size, free_port(), threads, out_dir, args), nprocs=world_size, join=True)
        results = []
        for r in range(world_size):
            with open(Path(out_dir) / f"rank{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results
