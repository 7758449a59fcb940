"""End-to-end runs of the training loop on one CPU process: logs, validation, blending."""

from __future__ import annotations

import json

import pytest

from tests.conftest import base_config, run_engine, step_metrics, write_synthetic_dataset


def test_logs_validation_and_blend_share(tmp_path, synthetic_data):
    other = str(write_synthetic_dataset(tmp_path / "other", 300, seed=5))
    cfg = base_config(synthetic_data, tmp_path / "run")
    del cfg["data"]["paths"]
    cfg["data"]["blend"] = [
        {"name": "arith", "path": synthetic_data, "weight": 0.75},
        {"name": "other", "path": other, "weight": 0.25},
    ]
    cfg["training"].update(steps=6, eval_interval=3, eval_steps=1)
    cfg["logging"].update(interval=3, tensorboard=True)
    proc = run_engine(cfg)
    train = step_metrics(tmp_path / "run")
    valid = step_metrics(tmp_path / "run", "valid")
    assert [r["step"] for r in train] == list(range(1, 7))
    assert [r["step"] for r in valid] == [3, 6]
    for key in ("loss", "lr", "grad_norm", "step_time", "tokens_per_s", "tokens_per_s_per_gpu", "peak_mem_gib"):
        assert all(r[key] is not None and r[key] == r[key] for r in train), key
    # 6 steps x 8 sequences x 64 tokens: the realised mixture of consumed tokens is logged.
    share = train[-1]["share/arith"]
    assert share + train[-1]["share/other"] == pytest.approx(1.0)
    assert abs(share - 0.75) < 0.1
    assert "share arith" in proc.stdout and "validation at step 6" in proc.stdout
    assert "MFU n/a" in proc.stdout  # CPU: no peak to compare against
    assert list((tmp_path / "run" / "logs" / "tensorboard").glob("events.out.tfevents.*"))

    # The per-source token counts behind the share are saved and continue after a resume.
    tokens_per_step = 8 * 64
    meta = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000006" / "engine_meta.json").read_text())
    assert sum(meta["source_tokens"]) == 6 * tokens_per_step
    cfg["training"].update(steps=8, eval_interval=0)
    cfg["checkpoint"]["resume"] = True
    run_engine(cfg)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "iter_0000008" / "engine_meta.json").read_text())
    assert sum(meta["source_tokens"]) == 8 * tokens_per_step


@pytest.mark.slow  # the chaos test checks every step is recorded once after kills and resumes
def test_resume_after_a_crash_records_each_step_once(tmp_path, synthetic_data):
    """A crash after the last checkpoint leaves records the resumed run writes again: they are
    dropped at the resume, so metrics.jsonl and summarize_metrics see each step once."""
    import shutil
    import subprocess
    import sys

    cfg = base_config(synthetic_data, tmp_path / "run")
    cfg["training"]["steps"] = 6
    cfg["checkpoint"].update(save_interval=3, keep=0)
    run_engine(cfg)
    # The state of a run killed after logging step 6 but before its checkpoint was complete.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "iter_0000006")
    with open(tmp_path / "run" / "logs" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')  # a line torn by the kill
    cfg["checkpoint"]["resume"] = True
    run_engine(cfg)
    assert [r["step"] for r in step_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    out = subprocess.run(
        [sys.executable, "examples/summarize_metrics.py", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "steps measured: 5 (steps 2..6)" in out


def test_truncate_jsonl_is_atomic_and_keeps_earlier_steps(tmp_path):
    from engine.metrics import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "split": "train"}) + "\n" for s in (1, 2, 3, 2, 3)) + '{"st')
    assert truncate_jsonl(path, 2) == 3
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def _reduce_tagged_metrics(rank):
    """Trainer._reduce_metrics on this rank's two micro-batches, tagged by rank (no model needed)."""
    import types

    import torch

    from engine.trainer import Trainer

    owner = types.SimpleNamespace(
        objective=types.SimpleNamespace(metric_names=["loss_sum", "loss_tokens"]), dataset_names=["a", "b"]
    )
    store = [
        {"loss_sum": torch.tensor(1.0 + rank), "loss_tokens": torch.tensor(10.0), "tokens_ds0": torch.tensor(4.0)},
        {
            "loss_sum": torch.tensor(100.0 * (rank + 1)),
            "loss_tokens": torch.tensor(5.0),
            "tokens_ds1": torch.tensor(2.0),
        },
    ]
    return Trainer._reduce_metrics(owner, store)


@pytest.mark.parametrize(
    "layout, sizes, expected",
    [
        # DP=2: both replicas' sums; TP=2: one rank per replica (rank 0); PP=2: the last stage (rank 1).
        ("dp2", {}, {"loss_sum": 303.0, "loss_tokens": 30.0, "tokens_ds0": 8.0, "tokens_ds1": 4.0}),
        ("tp2", {"tensor": 2}, {"loss_sum": 101.0, "loss_tokens": 15.0, "tokens_ds0": 4.0, "tokens_ds1": 2.0}),
        ("pp2", {"pipeline": 2}, {"loss_sum": 202.0, "loss_tokens": 15.0, "tokens_ds0": 4.0, "tokens_ds1": 2.0}),
    ],
)
def test_metric_reduction_counts_each_replica_once(run_distributed, layout, sizes, expected):
    """Two in-process gloo ranks: micro-batch sums are reduced over data-parallel replicas only
    (tensor-parallel copies and earlier pipeline stages do not add), and every rank gets them."""
    assert run_distributed(_reduce_tagged_metrics, 2, **sizes) == [expected, expected], layout
