"""Keep a rank's process tree tied to its run: no helper that dies early, none that outlives it.

Three things go wrong when a job is signalled or its launcher dies (issue #9):

* megatron-core's ``dist_checkpointing`` (0.16.1, ``strategies/filesystem_async.py``) collects
  the write results of every save through a ``multiprocessing`` *manager* process it starts
  (spawn) at the first save and keeps for the life of the rank. torchrun signals each worker's
  process group, SLURM signals every process of the step, Ctrl-C signals the foreground group:
  the manager dies with the default action, and the preemption checkpoint that follows fails
  with ``BrokenPipeError`` (exit 1, only ``iter_N.tmp``, no requeue). The manager also never
  notices its parent's death, so a rank killed with SIGKILL leaves it (and the resource
  tracker holding its pipe) behind for good. The engine saves synchronously, so the results
  never leave the rank's process: ``in_process_write_results`` gives megatron-core a plain
  in-process queue for the run and no manager is started at all.
* torchrun killed with SIGKILL leaves its workers training (they run in their own sessions)
  and rank 0 holding the run lock. ``ParentWatchdog`` turns the death of the parent into the
  same agreed stop as a scheduler signal.
* Anything else that starts ``multiprocessing`` children is ended with the run by
  ``end_helper_processes``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Callable, Iterator, Optional


@contextlib.contextmanager
def in_process_write_results() -> Iterator[None]:
    """While active, megatron-core's synchronous ``dist_checkpointing.save`` collects its write
    results in an in-process queue instead of a long-lived manager process.

    Valid for synchronous saves only (the writer function runs in this process, see
    ``AsyncRequest.execute_sync``); an asynchronous save would fail loudly with "results_queue
    should not be empty". megatron-core has no option for this, so its module-level cache
    ``_results_queue`` (filled lazily by ``_get_write_results_queue``) is set for the duration
    and restored afterwards."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


class ParentWatchdog:
    """A daemon thread that calls ``on_orphaned`` once when this process's parent dies.

    Polling ``os.getppid()`` is used rather than ``PR_SET_PDEATHSIG``: the death signal fires
    when the parent *thread* that forked us exits (not the parent process), it is cleared by
    some exec paths, and it cannot run a clean stop. After the callback, if the process is
    still alive ``grace_s`` later (a peer rank died too and the agreed stop hangs in a
    collective), the watchdog ends it with ``os._exit(exit_code)``; the kernel then releases
    the run lock."""

    def __init__(
        self, on_orphaned: Callable[[], None], poll_s: float = 0.5, grace_s: float = 300.0, exit_code: int = 1
    ):
        self.on_orphaned = on_orphaned
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.exit_code = exit_code
        self.parent = os.getppid()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "ParentWatchdog":
        """Start watching (no-op when the parent is already init: nothing to outlive)."""
        if self.parent > 1:
            self._thread = threading.Thread(target=self._run, name="parent-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the run ended on its own)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if os.getppid() != self.parent:
                print(f"parent process {self.parent} is gone (launcher killed?): stopping this rank", flush=True)
                self.on_orphaned()
                if not self._stop.wait(self.grace_s):
                    print(f"still running {self.grace_s:.0f} s after the parent died: exiting", flush=True)
                    os._exit(self.exit_code)
                return


def signal_self(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A callback that sends ``signum`` to this process: the preemption handler (when
    installed) turns it into the agreed checkpoint-and-exit, otherwise it ends the process."""
    return lambda: os.kill(os.getpid(), signum)


def end_helper_processes(timeout_s: float = 5.0) -> None:
    """Terminate (then kill) the ``multiprocessing`` children this process still has."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)


def write_exit_code(code: int, directory: Optional[str] = None) -> None:
    """Record this rank's exit code in ``$ENGINE_EXIT_CODE_DIR/rank<RANK>`` when that is set.

    torchrun replaces a worker's exit code with its own (1), so the launcher scripts read
    these files to return 75 (requeue) when the ranks stopped on a signal."""
    directory = directory or os.environ.get("ENGINE_EXIT_CODE_DIR")
    if not directory:
        return
    with contextlib.suppress(OSError):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank{os.environ.get('RANK', '0')}")
        with open(path, "w") as f:
            f.write(f"{code}\n")
