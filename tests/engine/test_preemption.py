"""Signals stop a run cleanly (checkpoint, exit code 75, resume continues); the run-directory lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.checkpoint import latest_checkpoint, read_meta
from engine.preemption import PreemptionHandler
from engine.run_lock import RunLockError, acquire_for_run, try_lock
from tests.conftest import REPO, base_config, run_engine, step_metrics, torchrun_train_cmd


class FakeTrainer:
    def __init__(self):
        self.stops = []

    def request_stop(self, code, reason):
        self.stops.append((code, reason))


def test_handler_stops_when_any_rank_saw_a_signal():
    """The decision is the all-reduced MAX of the ranks' flags, not the local flag."""
    other_rank_flag = [0]
    handler = PreemptionHandler(["SIGUSR1"], 75, all_reduce_max=lambda local: max(local, other_rank_flag[0]))
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    try:
        handler.on_step_end(trainer, 1, {})
        assert trainer.stops == []
        other_rank_flag[0] = int(signal.SIGUSR1)  # only the other rank received it
        handler.on_step_end(trainer, 2, {})
        assert trainer.stops and trainer.stops[0][0] == 75 and "SIGUSR1" in trainer.stops[0][1]
    finally:
        handler.on_train_end(trainer)


def _stop_after_a_signal_to_rank_1(rank):
    """Two steps of a handler with the real all-reduce; only rank 1 signals itself, after step 1."""
    handler = PreemptionHandler(["SIGUSR1"], 75)
    trainer = FakeTrainer()
    handler.on_train_start(trainer)
    try:
        handler.on_step_end(trainer, 1, {})
        stops_after_step_1 = list(trainer.stops)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.time() + 10
            while handler.received is None and time.time() < deadline:  # delivery is asynchronous
                time.sleep(0.01)
        handler.on_step_end(trainer, 2, {})
    finally:
        handler.on_train_end(trainer)
    return {"received": handler.received, "after_step_1": stops_after_step_1, "stops": trainer.stops}


def test_stop_flag_all_reduce_stops_every_rank_at_the_same_step(run_distributed):
    """The real MAX all-reduce over two gloo ranks (in-process workers, no CLI): a signal that
    reached rank 1 alone stops rank 0 after the same step, with the same exit code."""
    ranks = run_distributed(_stop_after_a_signal_to_rank_1, 2)
    assert ranks[0]["received"] is None and ranks[1]["received"] == signal.SIGUSR1
    for r in ranks:
        assert r["after_step_1"] == []
        assert len(r["stops"]) == 1 and r["stops"][0][0] == 75, r
        assert "SIGUSR1 received (on at least one rank)" in r["stops"][0][1] and "at step 2" in r["stops"][0][1]


def _start(cfg: dict, run_dir: Path, extra=()) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "engine", "train", str(path), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} not seen:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow  # default suite: test_preemption_signals.py (SIGTERM to the group, then resume) and test_chaos.py
def test_sigterm_checkpoints_and_resume_continues(tmp_path, synthetic_data):
    run = tmp_path / "run"
    cfg = base_config(synthetic_data, run)
    cfg["training"].update(steps=40, global_batch_size=16)  # slow enough to be signalled mid-run
    proc = _start(cfg, run)
    _wait_for(proc, "step 2/40")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    ckpt = latest_checkpoint(str(run))
    stopped_at = read_meta(ckpt)["iteration"]
    assert 2 <= stopped_at < 40 and "received SIGTERM" in out
    cfg["training"]["steps"] = stopped_at + 3
    run_engine(cfg, overrides=["--resume"])
    steps = [r["step"] for r in step_metrics(run)]
    assert steps == list(range(1, stopped_at + 1)) + [stopped_at + 1, stopped_at + 2, stopped_at + 3]


def test_lock_refuses_a_second_writer_and_names_the_holder(tmp_path):
    lock = try_lock(tmp_path)
    try:
        # A second open file description conflicts even inside one process (flock semantics).
        with pytest.raises(RunLockError, match=rf"in use by host \S+ pid {os.getpid()}"):
            acquire_for_run(str(tmp_path))
    finally:
        lock.release()
    acquire_for_run(str(tmp_path)).release()  # free again
    assert acquire_for_run(str(tmp_path), enabled=False).fd is None


def test_second_run_in_the_same_directory_is_refused(tmp_path, synthetic_data):
    run = tmp_path / "run"
    holder = try_lock(run)
    try:
        proc = run_engine(base_config(synthetic_data, run), check=False)
    finally:
        holder.release()
    assert proc.returncode == 2 and "is in use by host" in proc.stderr


@pytest.mark.slow  # the agreement itself: test_stop_flag_all_reduce_stops_every_rank_at_the_same_step
def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path, synthetic_data):
    import psutil

    run = tmp_path / "run"
    cfg = base_config(synthetic_data, run)
    cfg["training"].update(steps=40, global_batch_size=16)
    path = run / "config.yaml"
    run.mkdir(parents=True)
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        torchrun_train_cmd(path),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(proc, "step 2/40", timeout=180)
    workers = psutil.Process(proc.pid).children(recursive=True)
    rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=180)[0]
    assert "received SIGUSR1" in out and "SIGUSR1 received (on at least one rank)" in out
    meta = read_meta(latest_checkpoint(str(run)))
    assert meta["iteration"] < 40
