"""Parallel layouts must train identically: same initial weights, same data, same losses.

Every layout starts from one checkpoint of initial weights (written single-rank, loaded
at the layout's TP/PP/EP shape, which also exercises resharding) and trains 5 steps on the
same global batches. A wrong reduction (e.g. gradients averaged twice over DP, a missing
tied-embedding sync across PP, an unsynchronised TP shard) changes the losses from step 2
on; the tolerance is 1e-5 relative, while such bugs move the loss by far more.
"""
from __future__ import annotations

import copy

import pytest

from tests.conftest import base_config, losses, run_engine

REL_TOL = 1e-5

LLAMA_LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, ["parallel.distributed_optimizer=true"]),
    "pp2_vp2": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
}


def _init_and_reference(tmp_path_factory, data, preset):
    root = tmp_path_factory.mktemp(preset)
    init_cfg = base_config(data, root / "init", preset)
    run_engine(init_cfg, overrides=["training.steps=0"])
    init_ckpt = root / "init" / "checkpoints" / "iter_0000000"
    assert (init_ckpt / "engine_meta.json").exists()
    ref_cfg = base_config(data, root / "single", preset)
    ref_cfg["checkpoint"]["init_from"] = str(init_ckpt)
    run_engine(ref_cfg)
    return root, init_ckpt, losses(root / "single")


@pytest.fixture(scope="module")
def llama_reference(tmp_path_factory, synthetic_data):
    return _init_and_reference(tmp_path_factory, synthetic_data, "tiny-llama")


def _assert_same(reference, got, label):
    assert len(got) == len(reference) == 5, (label, got)
    for step, (a, b) in enumerate(zip(reference, got), 1):
        assert abs(a - b) <= REL_TOL * abs(a), f"{label}: step {step} loss {b!r} != single-rank {a!r}"


def test_reference_run_learns(llama_reference):
    _, _, ref = llama_reference
    # The equality tests below are only meaningful if training actually moves the weights.
    assert ref[-1] < ref[0] - 0.05, ref


@pytest.mark.parametrize("layout", list(LLAMA_LAYOUTS))
def test_llama_layout_matches_single_rank(layout, llama_reference, synthetic_data):
    root, init_ckpt, ref = llama_reference
    nproc, overrides = LLAMA_LAYOUTS[layout]
    cfg = base_config(synthetic_data, root / layout, "tiny-llama")
    cfg["checkpoint"]["init_from"] = str(init_ckpt)
    run_engine(cfg, nproc=nproc, overrides=overrides)
    _assert_same(ref, losses(root / layout), layout)


def test_moe_ep2_matches_ep1(tmp_path_factory, synthetic_data):
    root, init_ckpt, ref = _init_and_reference(tmp_path_factory, synthetic_data, "tiny-moe")
    assert ref[-1] < ref[0], ref
    cfg = base_config(synthetic_data, root / "ep2", "tiny-moe")
    cfg["checkpoint"]["init_from"] = str(init_ckpt)
    run_engine(cfg, nproc=2, overrides=["parallel.expert=2"])
    _assert_same(ref, losses(root / "ep2"), "ep2")
