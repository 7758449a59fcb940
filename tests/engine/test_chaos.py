"""Chaos: a 2-rank job is killed and signalled at random points (before, during and after
checkpoint saves), resumed after every fault, and must end exactly where the uninterrupted
run ends: the same loss at every step, every checkpoint complete, verified and finite.

Faults arrive the way clusters deliver them: SIGKILL/SIGTERM/SIGUSR1 to the whole process
group (torchrun, SLURM and Ctrl-C signal the group), SIGKILL while a checkpoint is being
written, and SIGKILL of the launcher (torchrun) alone. The fault schedule is drawn from a
seeded RNG (``CHAOS_SEED`` overrides it; the seed is printed so a failure can be replayed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import pytest
import yaml

from engine.checkpoint import list_checkpoints, read_meta
from tests.conftest import REPO, base_config, run_engine, step_metrics, torchrun_train_cmd
from tests.processes import survivors

STEPS = 16
SAVE_INTERVAL = 2


def _config(data: str, run: Path) -> dict:
    cfg = base_config(data, run)
    cfg["training"].update(steps=STEPS, global_batch_size=16, micro_batch_size=1)  # ~0.3 s a step
    cfg["checkpoint"].update(save_interval=SAVE_INTERVAL, keep=3)
    return cfg


CHAOS_SITE = Path(__file__).parent / "chaos_site"


class Job:
    """``torchrun --nproc_per_node=2 -m engine train --resume`` in its own process group.

    torchrun starts each rank in a session of its own, so "the process group" (Ctrl-C, a
    shell's kill) reaches torchrun alone, which forwards SIGTERM/SIGUSR1; SLURM's scancel and
    ``--signal`` reach every process of the job. Both are exercised."""

    def __init__(self, cfg: dict, attempt: int, save_delay: float = 0.0):
        run = Path(cfg["checkpoint"]["dir"])
        run.mkdir(parents=True, exist_ok=True)
        path = run / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.run = run
        self.codes = run / f"exit_codes_{attempt}"
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            PYTHONUNBUFFERED="1",
            ENGINE_EXIT_CODE_DIR=str(self.codes),
            CHAOS_SAVE_DELAY_S=str(save_delay),
            PYTHONPATH=os.pathsep.join([str(CHAOS_SITE), str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        self.log = open(run / f"attempt_{attempt}.log", "w+")
        self.proc = subprocess.Popen(
            torchrun_train_cmd(path, 2, "--resume"),
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: dict = {}
        self.started = time.time()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def remember_tree(self) -> None:
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        self.seen.update({p.pid: p for p in procs})

    def wait_until(self, predicate, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.remember_tree()
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            time.sleep(0.01)
        raise AssertionError(f"{what} not reached in {timeout} s:\n{self.output()[-3000:]}")

    def signal_every_process(self, sig: int) -> None:
        """What scancel / SLURM's --signal do: every process of the job gets the signal."""
        import psutil

        self.remember_tree()
        for p in self.seen.values():
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.close()

    def rank_codes(self) -> List[str]:
        return [
            (self.codes / f"rank{r}").read_text().strip() if (self.codes / f"rank{r}").exists() else "-"
            for r in range(2)
        ]


def _step_logged(job: Job, step: int):
    return lambda: f"step {step}/{STEPS}" in job.output()


def _save_in_progress(job: Job):
    root = job.run / "checkpoints"
    return lambda: root.is_dir() and any(p.name.endswith(".tmp") for p in root.iterdir())


def _newest_iteration(run: Path) -> int:
    ckpts = list_checkpoints(str(run))
    return read_meta(ckpts[-1])["iteration"] if ckpts else 0


def _check_checkpoint(ckpt: Path, out: Path) -> None:
    """The checkpoint passes the engine's manifest check and torch's own DCP reader loads every
    tensor of it (an independent reader), all finite."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from engine.checkpoint import verify_checkpoint

    verify_checkpoint(ckpt)
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=False)
    tensors = []

    def walk(x):
        if torch.is_tensor(x):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    floats = [t for t in tensors if t.is_floating_point()]
    assert floats, f"{ckpt} holds no tensors"
    bad = sum(int(not torch.isfinite(t).all()) for t in floats)
    assert bad == 0, f"{ckpt}: {bad} of {len(floats)} tensors hold NaN/Inf"


# The default suite runs three faults that together cover a kill inside a save, a signal
# torchrun forwards and the launcher's death; the slow suite runs all six in a row.
FAULTS_DEFAULT = ["kill_during_save", "sigusr1_group", "kill_launcher"]
FAULTS_ALL = ["kill_all", "kill_during_save", "sigterm_all", "kill_launcher", "sigusr1_group", "kill_during_save"]


@pytest.mark.parametrize(
    "faults", [FAULTS_DEFAULT, pytest.param(FAULTS_ALL, marks=pytest.mark.slow)], ids=["three_faults", "six_faults"]
)
def test_chaos_faults_then_resume_equal_the_uninterrupted_run(tmp_path, synthetic_data, faults):
    seed = int(os.environ.get("CHAOS_SEED", "20261129"))
    rng = random.Random(seed)
    print(f"chaos seed {seed}")

    reference = tmp_path / "reference"
    run_engine(_config(synthetic_data, reference), nproc=2)
    expected = {r["step"]: r["loss"] for r in step_metrics(reference)}
    assert sorted(expected) == list(range(1, STEPS + 1))

    run = tmp_path / "chaos"
    cfg = _config(synthetic_data, run)
    history: List[str] = []
    for attempt, fault in enumerate(faults):
        start = _newest_iteration(run)
        if start >= STEPS - 2:
            break
        job = Job(cfg, attempt, save_delay=0.5 if fault == "kill_during_save" else 0.0)
        target = rng.randint(start + 1, min(start + 4, STEPS - 1))
        if fault == "kill_during_save":
            job.wait_until(_save_in_progress(job), "a checkpoint being written")
            time.sleep(rng.uniform(0.0, 0.4))  # inside the widened window
            job.signal_every_process(signal.SIGKILL)
        else:
            job.wait_until(_step_logged(job, target), f"step {target}")
            time.sleep(rng.uniform(0.0, 0.3))  # anywhere in the next step(s), saves included
            if fault == "kill_all":
                job.signal_every_process(signal.SIGKILL)
            elif fault == "kill_launcher":
                job.proc.kill()  # torchrun alone: its ranks must notice, checkpoint and stop
            elif fault == "sigterm_all":
                job.signal_every_process(signal.SIGTERM)
            else:
                os.killpg(job.proc.pid, signal.SIGUSR1)  # torchrun's group; torchrun forwards it
        code = job.finish()
        left = survivors(job, run, job.started, timeout=60)  # ranks, helpers, orphans
        codes = job.rank_codes()
        history.append(
            f"{fault} after iteration {start} (target {target}): torchrun {code}, ranks {codes}, "
            f"newest checkpoint {_newest_iteration(run)}"
        )
        assert not left, f"{history}: left behind {left}"
        if fault.startswith("kill_") and fault != "kill_launcher":
            assert code == -signal.SIGKILL, f"{history}\n{job.output()[-4000:]}"
        else:  # a signal the run handles: every rank checkpointed and asked for a requeue
            assert codes == ["75", "75"], f"{history}\n{job.output()[-4000:]}"
            assert _newest_iteration(run) > start, f"{history}: the preemption save did not land"
    print("\n".join(history))
    assert len(history) >= min(len(faults), 4), history

    final = Job(cfg, len(faults))
    assert final.finish(timeout=300) == 0, final.output()[-4000:]
    got = {r["step"]: r["loss"] for r in step_metrics(run)}
    records = [r["step"] for r in step_metrics(run)]
    assert records == list(range(1, STEPS + 1)), f"{history}: metrics.jsonl steps {records}"
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, history)
    ckpts = list_checkpoints(str(run))
    assert ckpts and read_meta(ckpts[-1])["iteration"] == STEPS
    leftovers = [
        p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("iter_") or p.name.endswith(".tmp")
    ]
    assert not leftovers, f"{history}: half-written checkpoints left behind: {leftovers}"
    for i, ckpt in enumerate(ckpts):
        _check_checkpoint(ckpt, tmp_path / f"ckpt{i}.pt")
