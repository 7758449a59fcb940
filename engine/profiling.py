"""Profiling: NVTX ranges, a step-exact CUDA profiler window, torch.profiler traces, OOM snapshots.

* ``nvtx_range(name)`` marks a region for Nsight Systems; a no-op without CUDA (or with
  ``profile.nvtx: false``), so the loop can call it unconditionally.
* ``ProfilerWindow`` calls ``cudaProfilerStart`` before step ``profile.start_step`` and
  ``cudaProfilerStop`` after step ``profile.end_step`` on ``profile.ranks``: under
  ``nsys profile --capture-range=cudaProfilerApi`` (``launchers/profile_nsys.sh``) exactly
  those steps are captured. With ``profile.torch_profiler`` the same window is recorded
  by ``torch.profiler``: a Chrome trace and a table of the top kernels/ops.
* ``OomSnapshot`` records the CUDA caching allocator's history and writes a snapshot when
  a step raises ``torch.OutOfMemoryError`` (open it at https://pytorch.org/memory_viz).

The start/stop functions are injectable, so the window's placement is tested on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional

import torch

from engine.callbacks.base import Callback
from engine.config import Config

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer

log = logging.getLogger(__name__)

_NVTX_ON = True


def set_nvtx(enabled: bool) -> None:
    """Turn the NVTX ranges of ``nvtx_range`` on or off for this process (``profile.nvtx``)."""
    global _NVTX_ON
    _NVTX_ON = enabled


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range around the body on CUDA; nothing on CPU."""
    if not (_NVTX_ON and torch.cuda.is_available()):
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


class NvtxIterator:
    """Wraps a data iterator so every ``next`` is one ``data`` NVTX range."""

    def __init__(self, inner: Iterator, name: str = "data"):
        self.inner = inner
        self.name = name

    def __iter__(self):
        return self

    def __next__(self):
        with nvtx_range(self.name):
            return next(self.inner)


def profile_dir(cfg: Config) -> Path:
    """Directory of traces, tables and snapshots."""
    return Path(cfg.profile.dir or Path(cfg.checkpoint.dir) / "profile")


def _cuda_profiler_start() -> None:
    torch.cuda.synchronize()  # earlier steps' kernels must not leak into the window
    torch.cuda.cudart().cudaProfilerStart()


def _cuda_profiler_stop() -> None:
    torch.cuda.synchronize()  # the window's last kernels must finish inside it
    torch.cuda.cudart().cudaProfilerStop()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class ProfilerWindow(Callback):
    """Open a profiling window before ``start`` and close it after ``end`` (1-based steps).

    ``start_fn``/``stop_fn`` default to ``cudaProfilerStart/Stop`` on CUDA and to a log
    line on CPU; tests inject recorders. A run that stops inside the window (end of
    training, a signal) still closes it, once."""

    def __init__(
        self,
        start: int,
        end: int,
        ranks: List[int],
        out_dir: Path,
        torch_profiler: bool = False,
        top_ops: int = 25,
        start_fn: Optional[Callable[[], None]] = None,
        stop_fn: Optional[Callable[[], None]] = None,
        rank: Optional[int] = None,
    ):
        self.start, self.end = start, max(end, start)
        self.ranks = list(ranks)
        self.out_dir = Path(out_dir)
        self.use_torch_profiler = torch_profiler
        self.top_ops = top_ops
        on_cuda = torch.cuda.is_available()
        self.start_fn = start_fn or (_cuda_profiler_start if on_cuda else self._cpu_note("start"))
        self.stop_fn = stop_fn or (_cuda_profiler_stop if on_cuda else self._cpu_note("stop"))
        self.rank = rank
        self.open = False
        self.torch_prof: Optional[torch.profiler.profile] = None

    @staticmethod
    def _cpu_note(what: str) -> Callable[[], None]:
        def note() -> None:
            print(
                f"[rank {_rank()}] profiler window {what} (no CUDA: cudaProfiler{what.capitalize()} skipped)",
                flush=True,
            )

        return note

    def _active(self) -> bool:
        rank = _rank() if self.rank is None else self.rank
        return not self.ranks or rank in self.ranks

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        if step != self.start or self.open or not self._active():
            return
        self.open = True
        if self.use_torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_prof = torch.profiler.profile(activities=activities, record_shapes=False)
            self.torch_prof.__enter__()
        self.start_fn()
        print(f"[rank {_rank()}] profiling steps {self.start}..{self.end}", flush=True)

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        if self.open and step >= self.end:
            self._close()

    def on_train_end(self, trainer: "Trainer") -> None:
        if self.open:
            self._close()

    def _close(self) -> None:
        self.open = False
        self.stop_fn()
        if self.torch_prof is not None:
            self.torch_prof.__exit__(None, None, None)
            self._write_torch_profile(self.torch_prof)
            self.torch_prof = None

    def _write_torch_profile(self, prof) -> None:
        """Chrome trace plus the top-ops table (by CUDA time on GPUs, CPU time otherwise)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = _rank()
        trace = self.out_dir / f"trace_rank{rank}.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=self.top_ops)
        table_path = self.out_dir / f"top_ops_rank{rank}.txt"
        table_path.write_text(f"steps {self.start}..{self.end}, sorted by {sort_by}\n{table}\n")
        print(
            f"[rank {rank}] torch.profiler: trace {trace}, top {self.top_ops} ops by {sort_by} in "
            f"{table_path}\n{table}",
            flush=True,
        )


class OomSnapshot(Callback):
    """Record allocator history from the start and dump it when a step runs out of memory."""

    def __init__(self, out_dir: Path, max_entries: int = 100_000, dump_fn: Optional[Callable[[str], None]] = None):
        self.out_dir = Path(out_dir)
        self.max_entries = max_entries
        self.dump_fn = dump_fn or torch.cuda.memory._dump_snapshot

    def on_train_start(self, trainer: "Trainer") -> None:
        if torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries)

    def on_error(self, trainer: "Trainer", exc: BaseException) -> None:
        if not isinstance(exc, torch.OutOfMemoryError):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"oom_snapshot_rank{_rank()}.pickle"
        self.dump_fn(str(path))
        print(
            f"[rank {_rank()}] out of memory: allocator snapshot written to {path} "
            f"(drag it into https://pytorch.org/memory_viz)",
            flush=True,
        )


def profiling_callbacks(cfg: Config) -> List[Callback]:
    """The profiling callbacks ``cfg.profile`` asks for."""
    pf = cfg.profile
    set_nvtx(pf.nvtx)
    out: List[Callback] = []
    if pf.start_step > 0:
        out.append(
            ProfilerWindow(
                pf.start_step,
                pf.end_step or pf.start_step,
                pf.ranks,
                profile_dir(cfg),
                torch_profiler=pf.torch_profiler,
                top_ops=pf.top_ops,
            )
        )
    if pf.memory_snapshot_on_oom:
        out.append(OomSnapshot(profile_dir(cfg)))
    return out
