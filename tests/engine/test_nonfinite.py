"""Non-finite steps: NaN in the gradients (finite loss) is skipped, never applied nor checkpointed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.checkpoint import META, NonFiniteStateError, TrainState, list_checkpoints, save_checkpoint
from tests.conftest import base_config, run_engine, step_metrics


def _blow_up_config(data, run_dir, **training):
    """lr 1e4 without warmup: the first steps have a finite loss, then a step's gradient norm is
    NaN while its loss is still finite (the fault of issue #9, in the gradients)."""
    cfg = base_config(data, run_dir)
    cfg["optimizer"].update(lr=1e4, min_lr=0.0)
    cfg["schedule"]["warmup_steps"] = 0
    cfg["training"].update(steps=8, **training)
    cfg["checkpoint"].update(save_interval=1, keep=1)
    return cfg


def _nonfinite_tensors(ckpt) -> list:
    """Names of floating-point tensors with NaN/Inf in a saved checkpoint (read offline)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / "flat.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    bad, stack = [], [("", torch.load(out, weights_only=False))]
    while stack:
        name, obj = stack.pop()
        if isinstance(obj, dict):
            stack += [(f"{name}.{k}", v) for k, v in obj.items()]
        elif torch.is_tensor(obj) and obj.is_floating_point() and not torch.isfinite(obj).all():
            bad.append(name)
    out.unlink()
    return bad


def _first_nan_grad_step(records) -> dict:
    bad = [r for r in records if not math.isfinite(r["grad_norm"])]
    assert bad, "the lr blow-up no longer produces a NaN gradient norm: adjust the test's lr"
    assert math.isfinite(bad[0]["loss"]), "the fault must be in the gradients, with a finite loss"
    return bad[0]


def test_nan_gradient_is_skipped_and_stops_with_a_finite_checkpoint(tmp_path, synthetic_data):
    cfg = _blow_up_config(synthetic_data, tmp_path / "stop")
    proc = run_engine(cfg, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = step_metrics(tmp_path / "stop")
    bad = _first_nan_grad_step(records)
    assert bad["skipped"] == 1 and bad["skipped_total"] == 1
    assert records[-1]["step"] == bad["step"]  # max_skipped_steps 0: the first one stops the run
    assert "grad_norm nan" in proc.stdout and "max_skipped_steps=0" in proc.stdout
    ckpts = list_checkpoints(str(tmp_path / "stop"))
    # keep=1: the one checkpoint left is the state after the skipped step, and it is finite.
    assert [c.name for c in ckpts] == [f"iter_{bad['step']:07d}"]
    meta = json.loads((ckpts[-1] / META).read_text())
    assert meta["skipped_steps"] == 1 and meta["consumed_train_samples"] == bad["step"] * 8
    assert _nonfinite_tensors(ckpts[-1]) == []


def test_exit_on_nonfinite_false_skips_counts_and_finishes(tmp_path, synthetic_data):
    cfg = _blow_up_config(synthetic_data, tmp_path / "go_on", exit_on_nonfinite=False)
    proc = run_engine(cfg)  # exit code 0
    records = step_metrics(tmp_path / "go_on")
    assert [r["step"] for r in records] == list(range(1, 9))
    bad = _first_nan_grad_step(records)
    skipped = [r["step"] for r in records if r["skipped"]]
    assert bad["step"] in skipped and records[-1]["skipped_total"] == len(skipped)
    assert all(not r["skipped"] for r in records if math.isfinite(r["grad_norm"]) and math.isfinite(r["loss"]))
    assert f"skipped {len(skipped)}" in proc.stdout
    final = list_checkpoints(str(tmp_path / "go_on"))[-1]
    assert final.name == "iter_0000008" and _nonfinite_tensors(final) == []


def test_save_refuses_nonfinite_weights(tmp_path, megatron_single_rank):
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteStateError, match="1 model/optimizer tensor.*model0.weight"):
        save_checkpoint(str(tmp_path), TrainState(iteration=7), [layer], None, None, "{}", save_optimizer=False)
    assert not (tmp_path / "checkpoints" / "iter_0000007").exists()
    assert not (tmp_path / "checkpoints" / "iter_0000007.tmp").exists()
