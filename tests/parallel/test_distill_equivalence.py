"""Distillation trains identically single-rank, TP=2 and PP=2, and resumes exactly.

The student starts from the teacher's own weights (the trained tiny-llama) and keeps the LM
loss (``skip_lm_loss: false``): step 1 has KL 0, the LM loss moves the student, and from
then on the KL term and its gradient (rescaled by modelopt's balancer to the LM loss) drive
it too. TP=2 splits the KL's vocabulary over two ranks (softmax denominators all-reduced);
PP=2 sends student and teacher activations between the stages in one widened p2p buffer
(modelopt's ``get_tensor_shapes_adjust_fn_for_distillation``). Tolerances are the engine's
equivalence ones (tests/parallel/test_post_training_equivalence.py). A run stopped after
step 2 and resumed (teacher re-loaded from its checkpoint) repeats steps 3-4 bit for bit.

The runs are ``Trainer(cfg).fit()`` in this process (single rank) and inside the session's
spawned gloo ranks (tests/distributed.py): no process start or import per run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import post_training_config
from tests.parallel.test_post_training_equivalence import GRAD_REL_TOL, REL_TOL

STEPS = 4


def _train(rank, cfg_path, overrides, stop_after):
    """One run of the trainer on this rank; the logged training metrics of each step."""
    from engine import process_guard
    from engine.callbacks import Callback
    from engine.run_config import load_run_config
    from engine.trainer import StopTraining, Trainer

    class Record(Callback):
        def __init__(self):
            self.rows = []

        def log_metrics(self, trainer, step, metrics, split="train"):
            if split == "train":
                self.rows.append({k: metrics[k] for k in ("loss", "kd_loss", "lm_loss", "grad_norm")})

        def on_step_end(self, trainer, step, metrics):
            if step == stop_after:
                trainer.request_stop(75, "test stops here")

    record = Record()
    try:
        with process_guard.in_process_write_results():
            Trainer(load_run_config(cfg_path, overrides), callbacks=[record]).fit()
    except StopTraining:
        pass
    return record.rows


def _config(post_training_data, teacher: Path, run_dir: Path) -> str:
    cfg = post_training_config(post_training_data, run_dir, "distill", "pretrain")
    ckpt = sorted((teacher / "checkpoints").glob("iter_*"))[-1]
    cfg["objective"]["distill"] = {"teacher": str(teacher), "skip_lm_loss": False, "logit_kl_temperature": 2.0}
    cfg["training"].update(steps=STEPS, global_batch_size=8, micro_batch_size=2)
    cfg["schedule"].update(warmup_steps=0)
    cfg["optimizer"].update(lr=1e-3, min_lr=1e-4)
    cfg["checkpoint"].update(init_from=str(ckpt))
    run_dir.mkdir(parents=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _close(a, b, tol):
    return abs(a - b) <= tol * abs(a)


@pytest.mark.slow
def test_distill_same_at_tp2_and_pp2_and_resume_exact(
    megatron_single_rank, post_training_data, trained_checkpoint, run_distributed, tmp_path
):
    teacher = trained_checkpoint("tiny-llama")
    ref = _train(0, _config(post_training_data, teacher, tmp_path / "single"), [], None)
    assert len(ref) == STEPS
    assert ref[0]["kd_loss"] == 0.0  # the student starts as the teacher
    assert all(r["kd_loss"] > 1e-4 for r in ref[1:]), ref  # then moves away: the KL term acts
    for name, overrides in (("tp2", ["parallel.tensor=2"]), ("pp2", ["parallel.pipeline=2"])):
        got = run_distributed(_train, 2, _config(post_training_data, teacher, tmp_path / name), overrides, None)
        assert got[0] == got[1], name  # every rank logs the globally reduced numbers
        for step, (a, b) in enumerate(zip(ref, got[0]), 1):
            where = (name, step, a, b)
            assert _close(a["loss"], b["loss"], REL_TOL), where
            assert _close(a["lm_loss"], b["lm_loss"], REL_TOL), where
            assert abs(a["kd_loss"] - b["kd_loss"]) <= REL_TOL * a["lm_loss"], where
            assert _close(a["grad_norm"], b["grad_norm"], GRAD_REL_TOL), where

    # Stopped after step 2 (checkpoint written), resumed in the same directory.
    cfg = _config(post_training_data, teacher, tmp_path / "resumed")
    first = _train(0, cfg, [], 2)
    second = _train(0, cfg, ["checkpoint.resume=true"], None)
    assert first == ref[:2]
    assert second == ref[2:]
