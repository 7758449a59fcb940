"""Run a test function on N gloo ranks in spawned worker processes: rank logic without the CLI.

For tests whose subject needs ranks but not ``python -m engine train`` (metric reductions, the
agreed stop flag, checkpoint round trips across layouts), as OLMo-core's ``run_distributed_test``
does. ``RankPool(world_size)`` spawns the workers (torch.multiprocessing, spawn), each joins a
gloo group on a free local port through the engine's own ``parallel.setup.init_distributed``;
``pool.run(fn, *args, tensor=2)`` then initialises megatron-core's parallel state at that
layout (``init_model_parallel``) on every rank, calls ``fn(rank, *args)`` there and returns the
ranks' results in rank order.

Workers are kept between calls: importing torch and megatron-core costs ~4 s per process, more
than most such tests, so a session pays it once per world size (the ``run_distributed``
fixture of tests/conftest.py owns the pools). A rank that raises, dies or does not answer in
time makes ``run`` raise AssertionError with that rank's traceback, and the pool is torn down
(the other ranks may be stuck in a collective): the next call starts fresh workers.

``fn`` and its arguments are pickled: ``fn`` must be a module-level function of an importable
module (a test module is; the parent's ``sys.path`` is sent with every call)."""

from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import queue
import socket
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch.multiprocessing as mp

_POLL_S = 0.2


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0, the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results) -> None:
    """One rank: join the gloo group, then run tasks until told to stop or the parent is gone."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    warnings.filterwarnings("ignore")  # as run_engine's PYTHONWARNINGS=ignore: megatron's fallback notices
    try:
        import torch

        torch.set_num_threads(1)
        from engine.config import ParallelConfig
        from parallel.setup import init_distributed, init_model_parallel, shutdown

        init_distributed(ParallelConfig(backend="gloo"))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    parent = mp.parent_process()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # pytest died: do not linger
                os._exit(1)
            continue
        if task is None:
            break
        path, payload = task
        try:
            sys.path[:] = path  # the caller's, so its test module imports here too
            fn, args, sizes, seed = pickle.loads(payload)
            init_model_parallel(ParallelConfig(backend="gloo", **sizes), seed=seed)
            out = fn(rank, *args)
            results.put((rank, True, out))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    shutdown()


class RankPool:
    """``world_size`` spawned ranks in one gloo group, running functions on request."""

    def __init__(self, world_size: int, start_timeout: float = 120.0):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, port, self._tasks[r], self._results), name=f"rank{r}", daemon=False
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(start_timeout, "start")

    def _collect(self, timeout: float, what: str) -> List[Any]:
        got: Dict[int, Any] = {}
        failed: Dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(got) + len(failed) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if p.exitcode is not None and r not in got]
                if dead and not failed:
                    failed.update({r: f"rank {r} died (exit code {self._procs[r].exitcode})" for r in dead})
                if failed and (time.monotonic() > deadline or dead):
                    break  # the others may wait in a collective for the dead or failed rank
                if time.monotonic() > deadline:
                    failed.update(
                        {
                            r: f"rank {r} gave no answer within {timeout:.0f} s"
                            for r in range(self.world_size)
                            if r not in got
                        }
                    )
                    break
                continue
            if ok:
                got[rank] = value
            else:
                failed[rank] = value
                deadline = min(deadline, time.monotonic() + 10.0)  # let the other ranks report theirs
        if failed:
            self.close(force=True)
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            raise AssertionError(f"distributed {what} failed on rank(s) {sorted(failed)}:\n{report}")
        return [got[r] for r in range(self.world_size)]

    @property
    def alive(self) -> bool:
        """Whether every worker is still running."""
        return all(p.is_alive() for p in self._procs)

    def run(
        self,
        fn: Callable,
        *args,
        tensor: int = 1,
        pipeline: int = 1,
        virtual_pipeline: Optional[int] = None,
        expert: int = 1,
        seed: int = 1234,
        timeout: float = 180.0,
    ) -> List[Any]:
        """``fn(rank, *args)`` on every rank at the given TP/PP/VP/EP sizes; the results in rank order."""
        sizes = dict(tensor=tensor, pipeline=pipeline, virtual_pipeline=virtual_pipeline, expert=expert)
        payload = pickle.dumps((fn, args, sizes, seed))
        for q in self._tasks:
            q.put((list(sys.path), payload))
        return self._collect(timeout, f"{getattr(fn, '__qualname__', fn)}({sizes})")

    def close(self, force: bool = False) -> None:
        """Stop the workers (politely, or at once with ``force``) and wait for them."""
        if not force:
            for q in self._tasks:
                try:
                    q.put(None)
                except (ValueError, OSError):
                    pass
            multiprocessing.connection.wait([p.sentinel for p in self._procs], timeout=30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
        for q in [*self._tasks, self._results]:
            q.cancel_join_thread()
            q.close()


class RankPools:
    """One ``RankPool`` per world size, started on first use and replaced after a failure."""

    def __init__(self):
        self._pools: Dict[int, RankPool] = {}

    def __call__(self, fn: Callable, world_size: int, *args, **layout) -> List[Any]:
        """Run ``fn(rank, *args)`` on ``world_size`` ranks (see ``RankPool.run`` for ``layout``)."""
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(world_size)
        try:
            return pool.run(fn, *args, **layout)
        except AssertionError:
            self._pools.pop(world_size, None)  # torn down by the failure
            raise

    def close(self) -> None:
        """Stop every pool."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
