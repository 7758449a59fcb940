"""Signals delivered the way torchrun, SLURM and Ctrl-C deliver them (to whole process groups),
after an earlier checkpoint; a killed launcher; and no process of the run left behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import List

import pytest
import yaml

from engine.checkpoint import checkpoint_root, latest_checkpoint, read_meta
from engine.run_lock import try_lock
from tests.conftest import base_config, run_engine, step_metrics, torchrun_train_cmd
from tests.processes import Job, survivors

STEPS = 40


def _config(synthetic_data, run: Path) -> Path:
    cfg = base_config(synthetic_data, run)
    cfg["training"].update(steps=STEPS, global_batch_size=16)
    cfg["checkpoint"]["save_interval"] = 2  # the signal comes after this first checkpoint
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)  # torchrun's own default
    return env


def _torchrun(path: Path) -> List[str]:
    return torchrun_train_cmd(path)


def _assert_complete_stop(run: Path) -> int:
    """The newest checkpoint is complete, later than the first periodic one, and no ``.tmp``
    is left; returns its iteration."""
    stopped_at = read_meta(latest_checkpoint(str(run)))["iteration"]
    assert 2 < stopped_at < STEPS
    assert not [d.name for d in checkpoint_root(str(run)).iterdir() if d.name.endswith(".tmp")]
    return stopped_at


def _rank_codes(codes: Path) -> dict:
    return {f.name: f.read_text().strip() for f in sorted(codes.iterdir())}


def test_sigterm_to_the_process_group_after_a_checkpoint(tmp_path, synthetic_data):
    """(a) One process in its own session; SIGTERM to the whole group after the first periodic
    checkpoint (megatron-core's checkpoint helpers are in that group too)."""
    run, since = tmp_path / "run", time.time()
    path = _config(synthetic_data, run)
    job = Job([sys.executable, "-m", "engine", "train", str(path)], _env(tmp_path))
    try:
        job.wait_for("saved checkpoint")
        job.remember_tree()
        os.killpg(job.proc.pid, signal.SIGTERM)
        assert job.wait() == 75, job.out[-3000:]
    finally:
        job.kill_all()
    stopped_at = _assert_complete_stop(run)
    assert survivors(job, run, since) == []
    cfg = yaml.safe_load(path.read_text())
    cfg["training"]["steps"] = stopped_at + 2
    run_engine(cfg, overrides=["--resume"])
    assert [r["step"] for r in step_metrics(run)][-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]


def _fault_after_first_save(
    run: Path, codes: Path, since: float, cmd: List[str], env: dict, deliver, timeout: float = 40
) -> None:
    """Start ``cmd``, wait for its first checkpoint, ``deliver(job)`` the fault, and require that
    nothing of the job survives, every rank exited 75 and the stop checkpoint is complete."""
    job = Job(cmd, env)
    try:
        job.wait_for("saved checkpoint")
        job.remember_tree()
        deliver(job)
        job.wait()
        assert survivors(job, run, since, timeout=timeout) == [], job.out[-3000:]
    finally:
        job.kill_all()
    assert _rank_codes(codes) == {"rank0": "75", "rank1": "75"}, job.out[-3000:]
    _assert_complete_stop(run)


@pytest.mark.slow  # the default suite's chaos test delivers the same fault (and checks the same outcome)
def test_sigusr1_to_torchruns_process_group(tmp_path, synthetic_data):
    """(b) SIGUSR1 to torchrun's process group, as a terminal or a batch script would send it.
    torchrun's default signal list lacks SIGUSR1, so torchrun dies; its workers (own sessions)
    notice, checkpoint and exit 75 rather than train on alone."""
    run, codes, since = tmp_path / "run", tmp_path / "codes", time.time()
    codes.mkdir()
    env = _env(tmp_path, ENGINE_EXIT_CODE_DIR=str(codes))
    _fault_after_first_save(
        run,
        codes,
        since,
        _torchrun(_config(synthetic_data, run)),
        env,
        lambda job: os.killpg(job.proc.pid, signal.SIGUSR1),
    )


@pytest.mark.slow  # the launcher tests forward signals through a wrapper script in the default suite
def test_srun_like_wrapper_around_torchrun(tmp_path, synthetic_data):
    """(c) A bash wrapper that forwards SIGTERM/SIGUSR1 to its task as srun does, around torchrun;
    the signal reaches the wrapper's whole process group (wrapper and torchrun, so torchrun gets
    it twice) and torchrun forwards it to each worker's group."""
    run, codes, since = tmp_path / "run", tmp_path / "codes", time.time()
    codes.mkdir()
    srun = tmp_path / "srun"
    srun.write_text(
        '#!/usr/bin/env bash\n"$@" &\nchild=$!\n'
        "trap 'kill -s TERM $child' TERM\ntrap 'kill -s USR1 $child' USR1\n"
        "while true; do rc=0; wait $child || rc=$?; kill -0 $child 2>/dev/null || break; done\n"
        "exit $rc\n"
    )
    srun.chmod(0o755)
    env = _env(
        tmp_path,
        ENGINE_EXIT_CODE_DIR=str(codes),
        TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    )
    _fault_after_first_save(
        run,
        codes,
        since,
        [str(srun), *_torchrun(_config(synthetic_data, run))],
        env,
        lambda job: os.killpg(job.proc.pid, signal.SIGTERM),
    )


@pytest.mark.slow  # the default suite's chaos test kills torchrun too (the next attempt needs the lock)
def test_kill_9_of_torchrun_stops_the_ranks_and_frees_the_lock(tmp_path, synthetic_data):
    """(e) torchrun killed with SIGKILL: both ranks stop within seconds and the run lock is free."""
    run, codes, since = tmp_path / "run", tmp_path / "codes", time.time()
    codes.mkdir()
    env = _env(tmp_path, ENGINE_EXIT_CODE_DIR=str(codes))
    _fault_after_first_save(
        run,
        codes,
        since,
        _torchrun(_config(synthetic_data, run)),
        env,
        lambda job: os.kill(job.proc.pid, signal.SIGKILL),
        timeout=30,
    )
    try_lock(run).release()  # nobody holds the run directory any more


def test_parent_watchdog_calls_back_once_when_the_parent_dies():
    """The watchdog runs its callback when the parent process changes (unit level)."""
    from engine.process_guard import ParentWatchdog

    calls = []
    dog = ParentWatchdog(lambda: calls.append(1), poll_s=0.05, grace_s=60)
    dog.parent = 2**30  # as if the original parent were gone (no such pid)
    dog.start()
    deadline = time.time() + 5
    while not calls and time.time() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert calls == [1]
