"""Extending a run (a larger ``training.steps`` on resume) continues the uninterrupted run's samples."""

from __future__ import annotations

from tests.conftest import base_config, run_engine, step_metrics, write_synthetic_dataset


def test_resume_with_more_steps_sees_the_uninterrupted_runs_samples(tmp_path):
    # ~60 training sequences: one epoch is ~7 steps of 8, so 16 steps cross two epoch boundaries.
    # megatron-core's order used to depend on the requested sample count (steps x batch): the
    # 6-step run shuffled one epoch, the 16-step run three epochs together.
    prefix = str(write_synthetic_dataset(tmp_path / "small", 40, seed=5))

    def config(run_dir, steps):
        cfg = base_config(prefix, run_dir)
        cfg["training"]["steps"] = steps
        cfg["schedule"] = {"warmup_steps": 1, "decay_style": "constant"}  # LR independent of the run length
        return cfg

    run_engine(config(tmp_path / "full", 16))
    run_engine(config(tmp_path / "extended", 6))
    run_engine(config(tmp_path / "extended", 16), overrides=["--resume"])
    full = step_metrics(tmp_path / "full")
    ext = step_metrics(tmp_path / "extended")
    assert [r["step"] for r in ext] == list(range(1, 7)) + list(range(7, 17))
    assert [r["loss"] for r in ext] == [r["loss"] for r in full]  # bitwise on CPU
