"""One writer per run directory: an flock'ed lock file held by rank 0 for the whole run.

Two jobs resuming into the same ``checkpoint.dir`` (a requeued job whose predecessor is
still shutting down, a copy-pasted config) would interleave checkpoints and retention
deletions. Rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.engine.lock`` and
writes its host, pid and SLURM job id into it; the kernel releases the lock when the
process exits, however it exits, so a crashed run never leaves a stale lock. The outcome
is broadcast so that every rank fails together with the holder named. (On a shared file
system the lock needs flock support there, as Lustre with ``-o flock`` and NFSv4 have.)
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from engine.config import ConfigError

LOCK_NAME = ".engine.lock"


class RunLockError(ConfigError):
    """Another process holds the run directory."""


class RunLock:
    """An acquired lock; ``release`` (or process exit) frees it."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path = path
        self.fd = fd

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder_text() -> str:
    return json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
    )


def try_lock(run_dir: str | Path) -> RunLock:
    """Take the lock of ``run_dir`` in this process or raise RunLockError naming the holder."""
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
        os.close(fd)
        try:
            h = json.loads(holder)
            holder = (
                f"host {h['host']} pid {h['pid']}"
                + (f" (SLURM job {h['slurm_job_id']})" if h.get("slurm_job_id") else "")
                + f" since {h['since']}"
            )
        except (ValueError, KeyError, TypeError):
            pass
        raise RunLockError(
            f"run directory {Path(run_dir)} is in use by {holder} ({path} is locked); "
            f"wait for that run to end or choose another checkpoint.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder_text() + "\n").encode(), 0)
    return RunLock(path, fd)


def acquire_for_run(run_dir: str, enabled: bool = True) -> RunLock:
    """Rank 0 takes the lock; every rank learns the outcome and raises together on failure."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, error = RunLock(Path(run_dir) / LOCK_NAME, None), None
    if enabled and rank == 0:
        try:
            lock = try_lock(run_dir)
        except RunLockError as exc:
            error = str(exc)
    if enabled and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunLockError(error)
    return lock
