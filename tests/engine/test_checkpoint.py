"""Checkpoints: exact resume, resharded resume, atomicity, retention, newest-by-iteration."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml

from engine.checkpoint import META, latest_checkpoint, list_checkpoints
from tests.conftest import base_config, losses, run_engine, step_metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data):
    """6 steps with a checkpoint every 3 (kept), the reference for the resume tests."""
    root = tmp_path_factory.mktemp("resume")
    cfg = base_config(synthetic_data, root / "full")
    cfg["training"]["steps"] = 6
    cfg["checkpoint"].update(save_interval=3, keep=0)
    run_engine(cfg)
    return root, cfg, step_metrics(root / "full")


def test_resume_reproduces_losses_bitwise(uninterrupted, synthetic_data):
    root, cfg, ref = uninterrupted
    ckpt = root / "full" / "checkpoints" / "iter_0000003"
    meta = json.loads((ckpt / META).read_text())
    assert meta["iteration"] == 3 and meta["consumed_train_samples"] == 3 * 8
    # The resolved config of the run is saved with the checkpoint.
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["training"]["steps"] == 6

    resumed = dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(root / "resumed"), load=str(ckpt)))
    run_engine(resumed)
    got = step_metrics(root / "resumed")
    assert [r["step"] for r in got] == [4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref[3:]]  # bitwise on CPU
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref[3:]]
    assert [r["lr"] for r in got] == [r["lr"] for r in ref[3:]]


def test_auto_resume_picks_newest_and_continues(uninterrupted, tmp_path):
    root, cfg, ref = uninterrupted
    run_dir = tmp_path / "auto"
    shutil.copytree(root / "full" / "checkpoints", run_dir / "checkpoints")
    # Newest is iter_0000006 (the run's end): resuming for 6 steps has nothing left to do,
    # so ask for 7 and check it starts at step 7 with the data position of 6 steps.
    auto = dict(
        cfg,
        checkpoint=dict(cfg["checkpoint"], dir=str(run_dir), resume=True),
        schedule=dict(cfg["schedule"], decay_steps=6),
        training=dict(cfg["training"], steps=7),
    )
    proc = run_engine(auto)
    assert "iteration 6, consumed samples 48" in proc.stdout
    assert [r["step"] for r in step_metrics(run_dir)] == [7]


@pytest.mark.slow  # the resharding itself: test_weights_round_trip_across_layouts_in_process
def test_resume_at_other_tensor_parallel_size(uninterrupted):
    """Optimizer state saved at TP=1 is resharded onto TP=2 and training continues identically."""
    root, cfg, ref = uninterrupted
    ckpt = root / "full" / "checkpoints" / "iter_0000003"
    resumed = dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(root / "tp2"), load=str(ckpt)))
    run_engine(resumed, nproc=2, overrides=["parallel.tensor=2"])
    got = losses(root / "tp2")
    for a, b in zip([r["loss"] for r in ref[3:]], got):
        assert abs(a - b) <= 1e-5 * a
    assert len(got) == 3


def test_retention_keeps_newest(tmp_path, synthetic_data):
    cfg = base_config(synthetic_data, tmp_path / "keep")
    cfg["training"]["steps"] = 4
    cfg["checkpoint"].update(save_interval=1, keep=2)
    run_engine(cfg)
    assert [p.name for p in list_checkpoints(str(tmp_path / "keep"))] == ["iter_0000003", "iter_0000004"]


def test_newest_is_by_iteration_and_incomplete_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [
        ("iter_0000020", True),
        ("iter_0000100", True),
        ("iter_0000200.tmp", True),
        ("iter_0000300", False),
        ("checkpoint-best", True),
        ("iter_0000099", True),
    ]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / META).write_text("{}")
    # Name sorting would pick "iter_0000300" (no metadata: half-written) or "checkpoint-best".
    assert latest_checkpoint(str(tmp_path)).name == "iter_0000100"
    assert [p.name for p in list_checkpoints(str(tmp_path))] == ["iter_0000020", "iter_0000099", "iter_0000100"]


@pytest.mark.slow  # tests/engine/test_nonfinite.py covers the policy (NaN in gradients, both settings)
def test_nonfinite_loss_stops_with_checkpoint(tmp_path, synthetic_data):
    cfg = base_config(synthetic_data, tmp_path / "nan")
    cfg["optimizer"].update(lr=1e30, min_lr=0.0, clip_grad=0.0)
    cfg["schedule"]["warmup_steps"] = 0
    proc = run_engine(cfg, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"(loss is|grad_norm) -?(nan|inf)", proc.stdout.lower()), proc.stdout[-2000:]
    newest = latest_checkpoint(str(tmp_path / "nan"))
    assert newest is not None
    # The bad step was skipped (no update) and is logged; the saved state is the one before
    # it, at the data position after it.
    records = step_metrics(tmp_path / "nan")
    assert records[-1]["skipped"] == 1
    assert json.loads((newest / META).read_text())["iteration"] == records[-1]["step"]


# ----------------------------------------------------------------------------- manifests
def _corrupt(ckpt, how: str) -> str:
    """Damage one shard of ``ckpt`` the way disks and copies do; returns its name."""
    shard = sorted(ckpt.glob("*.distcp"))[0]
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    else:  # same size, other bytes
        data = bytearray(shard.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 8] = bytes(8 - i for i in range(8))
        shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.parametrize("how", ["missing", "truncated", "overwritten"])
def test_corrupt_checkpoint_is_a_one_line_error_naming_the_file(uninterrupted, tmp_path, how):
    root, cfg, _ = uninterrupted
    ckpt = tmp_path / "c" / "iter_0000003"
    shutil.copytree(root / "full" / "checkpoints" / "iter_0000003", ckpt)
    assert (ckpt / "manifest.json").is_file()
    name = _corrupt(ckpt, how)
    run = dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(tmp_path / "run"), load=str(ckpt)))
    proc = run_engine(run, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("config error:")]
    assert len(errors) == 1 and name in errors[0] and "corrupt" in errors[0], proc.stderr[-3000:]
    assert {"missing": "is missing", "truncated": "bytes, manifest says", "overwritten": "CRC-32"}[how] in errors[0]
    assert "Traceback" not in proc.stderr


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(uninterrupted, tmp_path):
    root, cfg, ref = uninterrupted
    run_dir = tmp_path / "fb"
    shutil.copytree(root / "full" / "checkpoints", run_dir / "checkpoints")
    _corrupt(run_dir / "checkpoints" / "iter_0000006", "overwritten")
    resume = dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(run_dir), resume=True))
    proc = run_engine(resume, check=False)
    assert proc.returncode == 2 and "fallback_on_corrupt" in proc.stderr  # off by default: refused
    resume["checkpoint"]["fallback_on_corrupt"] = True
    proc = run_engine(resume)
    assert "iter_0000006" in proc.stderr and "falling back" in proc.stderr
    assert "iteration 3, consumed samples 24" in proc.stdout
    assert [r["loss"] for r in step_metrics(run_dir)] == [r["loss"] for r in ref[3:]]
    assert (run_dir / "checkpoints" / "iter_0000006.corrupt").is_dir()  # kept for inspection
    assert [p.name for p in list_checkpoints(str(run_dir))] == ["iter_0000003", "iter_0000006"]


# ----------------------------------------------------------------------------- timelines
def test_load_of_an_older_iteration_into_the_same_dir_is_refused(uninterrupted, tmp_path):
    root, cfg, _ = uninterrupted
    run_dir = tmp_path / "tl"
    shutil.copytree(root / "full" / "checkpoints", run_dir / "checkpoints")
    before = _mtimes(run_dir)
    load = dict(
        cfg,
        checkpoint=dict(
            cfg["checkpoint"], dir=str(run_dir), keep=1, load=str(run_dir / "checkpoints" / "iter_0000003")
        ),
    )
    proc = run_engine(load, check=False)
    assert proc.returncode == 2
    assert "iter_0000006" in proc.stderr and "another checkpoint.dir" in proc.stderr
    assert _mtimes(run_dir) == before


def _mtimes(run_dir):
    """Every file of the run's checkpoints with its modification time: a refused run touches none."""
    return {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}


def test_resume_behind_the_checkpoint_is_refused(uninterrupted, tmp_path):
    root, cfg, _ = uninterrupted
    run_dir = tmp_path / "behind"
    shutil.copytree(root / "full" / "checkpoints", run_dir / "checkpoints")
    before = _mtimes(run_dir)
    resume = dict(
        cfg,
        checkpoint=dict(cfg["checkpoint"], dir=str(run_dir), resume=True, keep=1),
        training=dict(cfg["training"], steps=4),
    )
    proc = run_engine(resume, check=False)
    assert proc.returncode == 2
    assert "training.steps=4 is behind" in proc.stderr and "iteration 6" in proc.stderr
    assert _mtimes(run_dir) == before


def test_retention_never_prunes_the_checkpoint_the_run_started_from(uninterrupted, tmp_path):
    root, cfg, _ = uninterrupted
    run_dir = tmp_path / "start"
    shutil.copytree(root / "full" / "checkpoints" / "iter_0000003", run_dir / "checkpoints" / "iter_0000003")
    resume = dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(run_dir), resume=True, keep=1, save_interval=1))
    run_engine(resume)
    assert [p.name for p in list_checkpoints(str(run_dir))] == ["iter_0000003", "iter_0000006"]


def test_save_never_overwrites_a_complete_checkpoint(tmp_path, megatron_single_rank):
    import torch

    from engine.checkpoint import CheckpointError, TrainState, save_checkpoint

    done = tmp_path / "checkpoints" / "iter_0000005"
    done.mkdir(parents=True)
    (done / META).write_text("{}")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(
            str(tmp_path), TrainState(iteration=5), [torch.nn.Linear(2, 2)], None, None, "{}", save_optimizer=False
        )
    assert (done / META).read_text() == "{}"


# ----------------------------------------------------------------------------- layouts, in-process
def _load_then_save(rank, run_dir, load_from):
    """Build tiny-llama at this rank's layout, load ``load_from`` (if any), save iteration 1 to ``run_dir``."""
    import torch
    from megatron.core import parallel_state as ps

    from engine.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from engine.run_config import load_run_config
    from models.build import build_gpt_chunks

    cfg = load_run_config(
        None,
        [
            "model.preset=tiny-llama",
            f"parallel.tensor={ps.get_tensor_model_parallel_world_size()}",
            f"parallel.pipeline={ps.get_pipeline_model_parallel_world_size()}",
        ],
    )
    chunks = build_gpt_chunks(cfg, torch.float32).chunks
    changed = None
    if load_from:
        params = [p for c in chunks for p in c.parameters()]
        with torch.no_grad():  # a fresh init may equal the saved weights (same seed): move them away
            for p in params:
                p.add_(1.0)
        before = [p.detach().clone() for p in params]
        load_checkpoint(load_from, chunks, load_optimizer=False)
        changed = all(not torch.equal(a, p) for a, p in zip(before, params))
    ckpt = save_checkpoint(run_dir, TrainState(iteration=1), chunks, None, None, "{}", save_optimizer=False)
    return {"ckpt": str(ckpt), "changed": changed}


def _weights(ckpt, out):
    """The checkpoint's model tensors by global key (layout-independent), via torch's DCP converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}


def test_weights_round_trip_across_layouts_in_process(tmp_path, run_distributed):
    """Two gloo ranks, no CLI: weights saved at DP=2 are loaded at TP=2 (resharded), saved again,
    loaded at PP=2 (the tied embedding split from the output layer), saved again; the three
    checkpoints hold bitwise the same tensors, and each load replaced every (shifted) weight."""
    dp = run_distributed(_load_then_save, 2, str(tmp_path / "dp2"), None)
    tp = run_distributed(_load_then_save, 2, str(tmp_path / "tp2"), dp[0]["ckpt"], tensor=2)
    pp = run_distributed(_load_then_save, 2, str(tmp_path / "pp2"), tp[0]["ckpt"], pipeline=2)
    assert [r["changed"] for r in tp + pp] == [True] * 4
    ref = _weights(dp[0]["ckpt"], tmp_path / "dp2.pt")
    assert len(ref) > 5, sorted(ref)
    for name, got in (("tp2", tp), ("pp2", pp)):
        w = _weights(got[0]["ckpt"], tmp_path / f"{name}.pt")
        assert sorted(w) == sorted(ref), name
        for k in ref:
            assert w[k].shape == ref[k].shape and torch.equal(w[k], ref[k]), (name, k)


def test_bf16_run_checkpoints_and_resumes_exactly(tmp_path, synthetic_data):
    """bf16 with the distributed optimizer: the save gathers the fp32 Adam state per parameter
    group. Without TE, megatron-core builds torch norms in fp32; mixed with bf16 weights in one
    group, megatron-core 0.16.1 maps a norm's state onto the embedding's slot and the save died
    with a size mismatch (models/build.py casts every parameter, as Float16Module does)."""
    cfg = base_config(synthetic_data, tmp_path / "full")
    cfg["precision"] = {"dtype": "bf16"}
    cfg["training"]["steps"] = 4
    cfg["checkpoint"].update(save_interval=2, keep=0)
    run_engine(cfg)
    ref = losses(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "iter_0000002"
    resumed = dict(cfg, checkpoint=dict(cfg["checkpoint"], dir=str(tmp_path / "resumed"), load=str(ckpt)))
    run_engine(resumed)
    assert losses(tmp_path / "resumed") == ref[2:]
