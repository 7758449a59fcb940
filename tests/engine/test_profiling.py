"""Profiling window placement (injected hooks), a CPU torch.profiler run, OOM snapshots, NVTX no-op."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.profiling import NvtxIterator, OomSnapshot, ProfilerWindow, nvtx_range, profiling_callbacks
from engine.run_config import load_run_config
from tests.conftest import base_config, run_engine


class Recorder:
    def __init__(self):
        self.calls = []
        self.step = 0

    def start(self):
        self.calls.append(("start", self.step))

    def stop(self):
        self.calls.append(("stop", self.step))


def drive(window: ProfilerWindow, rec: Recorder, steps: int, stop_early_at: int = 0):
    """Call the hooks the way Trainer.fit does."""
    window.on_train_start(None)
    for step in range(1, steps + 1):
        rec.step = step
        window.on_step_start(None, step)
        window.on_step_end(None, step, {})
        if step == stop_early_at:
            break
    window.on_train_end(None)


@pytest.mark.parametrize(
    "start,end,steps,expected",
    [
        (3, 5, 8, [("start", 3), ("stop", 5)]),
        (2, 2, 4, [("start", 2), ("stop", 2)]),
        (4, 9, 6, [("start", 4), ("stop", 6)]),  # the run ends inside the window: closed once at the end
    ],
)
def test_window_starts_and_stops_exactly_once(tmp_path, start, end, steps, expected):
    rec = Recorder()
    drive(ProfilerWindow(start, end, [0], tmp_path, start_fn=rec.start, stop_fn=rec.stop, rank=0), rec, steps)
    assert rec.calls == expected


def test_window_only_on_configured_ranks_and_not_when_run_stops_before(tmp_path):
    rec = Recorder()
    drive(ProfilerWindow(2, 3, [0], tmp_path, start_fn=rec.start, stop_fn=rec.stop, rank=1), rec, 5)
    assert rec.calls == []
    drive(ProfilerWindow(2, 3, [], tmp_path, start_fn=rec.start, stop_fn=rec.stop, rank=1), rec, 5)
    assert rec.calls == [("start", 2), ("stop", 3)]  # empty list: every rank
    rec = Recorder()
    drive(ProfilerWindow(4, 5, [0], tmp_path, start_fn=rec.start, stop_fn=rec.stop, rank=0), rec, 5, stop_early_at=2)
    assert rec.calls == []


def test_callbacks_from_config():
    cfg = load_run_config(None, ["profile.start_step=3", "profile.memory_snapshot_on_oom=true"])
    kinds = [type(cb).__name__ for cb in profiling_callbacks(cfg)]
    assert kinds == ["ProfilerWindow", "OomSnapshot"]
    assert profiling_callbacks(load_run_config(None, [])) == []


def test_oom_snapshot_is_dumped_on_out_of_memory_only(tmp_path):
    dumped = []
    cb = OomSnapshot(tmp_path, dump_fn=dumped.append)
    cb.on_error(None, RuntimeError("not an OOM"))
    assert dumped == []
    cb.on_error(None, torch.OutOfMemoryError("CUDA out of memory"))
    assert dumped == [str(tmp_path / "oom_snapshot_rank0.pickle")]


def test_nvtx_helpers_are_no_ops_on_cpu():
    with nvtx_range("forward-backward"):
        pass
    assert list(NvtxIterator(iter([1, 2]))) == [1, 2]


def test_real_run_window_and_torch_profiler_on_cpu(tmp_path, synthetic_data):
    """The CLI run logs the window once at the configured steps and writes the trace and table."""
    cfg = base_config(synthetic_data, tmp_path / "run")
    cfg["training"]["steps"] = 4
    cfg["profile"] = {"start_step": 2, "end_step": 3, "torch_profiler": True, "top_ops": 10}
    proc = run_engine(cfg)
    assert proc.stdout.count("profiler window start") == 1 and proc.stdout.count("profiler window stop") == 1
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "profiler window start" in line)
    stop = next(i for i, line in enumerate(lines) if "profiler window stop" in line)
    assert lines[start + 2].startswith("step 2/4") or any(ln.startswith("step 2/4") for ln in lines[start:stop])
    assert any(ln.startswith("step 3/4") for ln in lines[start:stop])
    assert not any(ln.startswith("step 4/4") for ln in lines[start:stop])
    prof = Path(tmp_path / "run" / "profile")
    assert (prof / "trace_rank0.json").stat().st_size > 0
    table = (prof / "top_ops_rank0.txt").read_text()
    assert "steps 2..3" in table and "aten::" in table
