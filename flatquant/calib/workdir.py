"""Calibration work directories that survive kills, damage and a second run on the same ``--out``.

* Every file is written atomically: to a temporary file in the same folder, flushed to disk, then
  ``os.replace``-d over the target, so a kill leaves either the old file or the new one, never half of one.
* A per-layer checkpoint that cannot be read, or that belongs to another calibration (its fingerprint
  differs), is reported in one warning line and recomputed.
* A work directory is used by one run at a time: :func:`workdir_lock` creates ``.lock`` holding the owner's
  pid and host; a second run is refused in one line while that process lives; the lock of a dead process on
  this host is taken over (with a warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

log = logging.getLogger(__name__)
Params = dict[str, Tensor]
LOCK_NAME = ".lock"


class WorkdirBusy(ValueError):
    """The work directory is locked by another live calibration."""


def layer_ckpt(workdir: Path, i: int) -> Path:
    """Path of layer ``i``'s checkpoint in ``workdir``."""
    return Path(workdir) / "layers" / f"layer_{i:03d}.safetensors"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def fsync_path(path: Path) -> None:
    """Flush ``path``'s data to disk (before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_file(tensors: Params, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` that never leaves a partial ``path`` behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_layer(path: Path, fingerprint: str) -> tuple[Params, dict[str, str]] | None:
    """A finished layer's tensors and metadata, or ``None`` when it must be (re)computed.

    A missing file returns ``None`` silently; an unreadable file (truncated by a kill, not safetensors)
    or one written by another calibration (different fingerprint) is reported in one warning line.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            if meta.get("fingerprint") != fingerprint:
                log.warning("%s belongs to another calibration (fingerprint %s, expected %s); recomputing the layer",
                            path, meta.get("fingerprint"), fingerprint)
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # any damage means: recompute
        log.warning("%s is damaged (%s); recomputing the layer", path, str(e).splitlines()[0] if str(e) else
                    type(e).__name__)
        return None
    if not tensors or any(not t.is_floating_point() or not torch.isfinite(t).all() for t in tensors.values()):
        log.warning("%s holds no usable tensors; recomputing the layer", path)
        return None
    return tensors, meta


def _read_lock(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[Path]:
    """Hold ``workdir/.lock`` (pid and host of this process) for the duration of the block.

    Re-entrant within one process. A lock left by a dead process on this host (or an unreadable one,
    from a kill between creating and writing it) is taken over with a warning.

    Raises:
        WorkdirBusy: another live process (or a process on another host) holds the lock.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / LOCK_NAME
    host, pid = socket.gethostname(), os.getpid()
    mine = {"pid": pid, "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    owned = False
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _read_lock(lock)
            if info is not None and info["pid"] == pid and info.get("host") == host:
                break  # already ours: nested use
            if info is not None and (info.get("host") != host or pid_alive(info["pid"])):
                where = "" if info.get("host") == host else f" on host {info.get('host')}"
                raise WorkdirBusy(f"{workdir} is in use by another calibration (pid {info['pid']}{where}, since "
                                  f"{info.get('since', '?')}); wait for it to finish or use another --out "
                                  f"(delete {lock} only if that process is gone)") from None
            if info is None and time.time() - lock.stat().st_mtime < 2.0:
                time.sleep(0.5)  # another process may be between creating and writing its lock
                continue
            log.warning("taking over the stale lock %s (%s)", lock,
                        f"pid {info['pid']} no longer runs" if info else "unreadable")
            stale = lock.with_name(f"{LOCK_NAME}.stale.{pid}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(lock, stale)
                stale.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(mine))
            f.flush()
            os.fsync(f.fileno())
        owned = True
        break
    else:
        raise WorkdirBusy(f"could not lock {workdir}: {lock} keeps changing; is another calibration starting?")
    try:
        yield lock
    finally:
        if owned:
            info = _read_lock(lock)
            if info is not None and info["pid"] == pid and info.get("host") == host:
                lock.unlink(missing_ok=True)
