"""Layer-parallel calibration with ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Each layer trains on the FP activations at its input and draws its randomness from its own generator
(:func:`flatquant.calib.loop.layer_generator`), so once those activations are known the layers are
independent. :func:`calibrate_parallel` gives every rank a contiguous block of the layers that are not
finished yet (:func:`assign_layers`); a rank recomputes its block's FP inputs by FP forwards through the
earlier layers, trains its layers, and writes their checkpoints. An FP forward costs about a tenth of a
layer's training at paper settings, so later ranks get fewer layers. Streaming the inputs from the previous
rank instead would save the repeated forwards but not wall time: the FP chain is sequential, so the input
of layer ``s`` is not known before ``s`` forwards have run, on whichever rank. Rank 0 holds the
work-directory lock, checks it, and assembles the result with where each layer came from. Because every
layer is computed by the same code on the same inputs as in one process, the result is bit-identical to a
single-process run, and a run can be resumed with any number of processes.

The data-parallel path this module used to hold (each step's batch split across ranks, gradients
all-reduced every step) is retired: it could not be bit-identical (the reduction order differs; on two
H200s over NCCL its transforms differed from one GPU's by up to 10 % relative L2), it synchronised every
step, and its only advantage, dividing the activation buffers between ranks, is not needed: one
LLaMA-3-70B layer at paper settings fits on one GPU (``docs/memory.md``).

Launch: ``torchrun --nproc-per-node N -m flatquant.cli calibrate ...``; :func:`launch_cpu` spawns a local
gloo group of CPU processes (tests, CPU-only machines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.spec import QuantConfig, TransformConfig
from ..models.model import ModelWeights
from .config import CalibConfig
from .loop import (
    CalibrationMismatch,
    LayerResult,
    _check_workdir,
    calibrate_layers,
    fingerprint,
    finished_layers,
)
from .methods import needs_data
from .workdir import WorkdirBusy, atomic_save_file, layer_ckpt, workdir_lock

log = logging.getLogger(__name__)
Params = dict[str, Tensor]


#: the FP forward of one layer over the calibration set, in units of that layer's training (paper settings,
#: LLaMA-3-8B layer on the H100: 2.5 s against 21.3 s of training, ``bench/results/calib_llama3-8b_15ep.json``)
FP_PASS_COST = 0.1


def _block_cost(block: Sequence[int], fp_cost: float) -> float:
    """Time of a rank calibrating ``block``: FP forwards through every earlier layer (and any finished one in the
    block), then training each of its layers, in units of one layer's training."""
    return 0.0 if not block else fp_cost * (block[-1] + 1 - len(block)) + len(block)


def _fill(layers: list[int], world_size: int, budget: float, fp_cost: float) -> list[list[int]] | None:
    blocks, start = [], 0
    for _ in range(world_size):
        end = start
        while end < len(layers) and _block_cost(layers[start:end + 1], fp_cost) <= budget + 1e-9:
            end += 1
        blocks.append(layers[start:end])
        start = end
    return blocks if start == len(layers) else None


def assign_layers(layers: Sequence[int], world_size: int, fp_cost: float = FP_PASS_COST) -> list[list[int]]:
    """Split ``layers`` (ascending) into ``world_size`` contiguous blocks that finish at about the same time.

    A rank whose block starts at layer ``s`` first runs ``s`` FP forwards (each ``fp_cost`` of a layer's
    training) to get its inputs, so later ranks get fewer layers: the blocks minimise the largest
    :func:`_block_cost` (80 layers on 8 ranks: 14, 13, 11, 10, 9, 8, 8, 7 layers, at most 14.5 layer-times per
    rank, against 70 · 0.1 + 10 = 17 for the last of 8 blocks of 10). ``fp_cost=0`` gives sizes that differ
    by at most one.
    """
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    layers = sorted(layers)
    lo, hi = 0.0, _block_cost(layers, fp_cost)
    for _ in range(60):  # bisect the smallest feasible per-rank budget
        mid = (lo + hi) / 2
        if _fill(layers, world_size, mid, fp_cost) is None:
            lo = mid
        else:
            hi = mid
    blocks = _fill(layers, world_size, hi, fp_cost)
    assert blocks is not None
    return blocks


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(obj: Any, device: torch.device) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), if any.

    NCCL when ``device`` is CUDA (each rank then uses ``cuda:$LOCAL_RANK``), gloo otherwise.

    Returns:
        ``(rank, world_size, this rank's device)``; ``(0, 1, device)`` outside ``torchrun``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        rank, world = _rank_world()
        return rank, world, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); start at most "
                             f"{torch.cuda.device_count()} processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def collective_lock(workdir: Path, device: torch.device) -> Iterator[None]:
    """Every rank enters; rank 0 holds ``workdir``'s lock (:func:`workdir_lock`) for the block.

    Raises:
        WorkdirBusy: on every rank, when another live calibration holds the lock.
    """
    rank, world = _rank_world()
    with contextlib.ExitStack() as stack:
        err = None
        if rank == 0:
            try:
                stack.enter_context(workdir_lock(workdir))
            except WorkdirBusy as e:
                err = str(e)
        if world > 1:
            err = _broadcast(err, device)
        if err is not None:
            raise WorkdirBusy(err)
        yield


def calibrate_parallel(
    weights: ModelWeights,
    calib_tokens: Tensor | None,  # (nsamples, seqlen) int64, the same on every rank
    qcfg: QuantConfig,
    tcfg: TransformConfig,
    ccfg: CalibConfig,
    *,
    device: torch.device | str,
    workdir: Path | None = None,
) -> tuple[list[Params], dict[str, Any]]:
    """Layer-parallel :func:`flatquant.calib.loop.calibrate`: every rank of the process group (if any)
    calibrates a contiguous block of the unfinished layers; all ranks return the whole result.

    Every rank passes the same arguments. Rank 0 locks and checks ``workdir`` and finds the finished layers;
    each rank writes the checkpoints of its own layers (rank 0 also writes any it cannot see, for work
    directories that are not on a shared file system). Without a process group this is one process
    calibrating everything.

    Returns:
        ``(flats, provenance)``: one flat parameter dict per layer (CPU, fp32, identical on every rank and
        bit-identical to a single-process run), and ``{"world_size", "layer_ranks", "layer_world_sizes",
        "resumed_layers"}``: the process count of this run, and for each layer the rank and process count
        of the run that trained it, and which layers were loaded from checkpoints of an earlier run.

    Raises:
        CalibrationMismatch, WorkdirBusy: on every rank, when ``workdir`` holds another calibration or is in
        use by another run.
    """
    device = torch.device(device)
    rank, world = _rank_world()
    n = weights.args.n_layers
    workdir = Path(workdir) if workdir is not None else None
    if world == 1 or not needs_data(tcfg) or calib_tokens is None:
        # one process, or data-free (every rank computes the same transforms in no time)
        res = calibrate_layers(weights, calib_tokens, qcfg, tcfg, ccfg, layers=range(n), device=device,
                               workdir=workdir if rank == 0 else None)
        return _assemble(res, n, world)
    fp = fingerprint(weights, calib_tokens, qcfg, tcfg, ccfg)
    with contextlib.ExitStack() as stack:
        plan: Any = None
        if rank == 0:
            try:
                if workdir is not None:
                    stack.enter_context(workdir_lock(workdir))
                    _check_workdir(workdir, fp, {"quant": asdict(qcfg), "transform": asdict(tcfg),
                                                 "calib": ccfg.to_dict()})
                plan = (None, finished_layers(workdir, fp, range(n)))
            except (WorkdirBusy, CalibrationMismatch) as e:
                plan = (e, {})
        err, done = _broadcast(plan, device)
        if err is not None:
            raise err
        blocks = assign_layers([i for i in range(n) if i not in done], world)
        log.info("rank %d of %d: layers %s%s", rank, world, _span(blocks[rank]),
                 f" ({len(done)} finished earlier)" if done else "")
        mine = calibrate_layers(weights, calib_tokens, qcfg, tcfg, ccfg, layers=blocks[rank], device=device,
                                workdir=workdir, lock=False, rank=rank, world_size=world)
        gathered: list[dict[int, LayerResult] | None] = [None] * world
        dist.all_gather_object(gathered, mine)
        res = dict(done)
        for g in gathered:
            res.update(g or {})
        if rank == 0 and workdir is not None:
            for i, r in res.items():
                if not r.resumed and not layer_ckpt(workdir, i).is_file():
                    atomic_save_file(r.params, layer_ckpt(workdir, i), metadata={
                        "fingerprint": fp, "rank": str(r.rank), "world_size": str(r.world_size)})
        return _assemble(res, n, world)


def _span(layers: list[int]) -> str:
    return "none" if not layers else f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _assemble(res: dict[int, LayerResult], n: int, world: int) -> tuple[list[Params], dict[str, Any]]:
    missing = [i for i in range(n) if i not in res]
    if missing:
        raise RuntimeError(f"layers {missing} were calibrated by no rank")
    rs = [res[i] for i in range(n)]
    return [r.params for r in rs], {"world_size": world, "layer_ranks": [r.rank for r in rs],
                                    "layer_world_sizes": [r.world_size for r in rs],
                                    "resumed_layers": [i for i, r in enumerate(rs) if r.resumed]}


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
