"""SFT (packed, with replay), ORPO and DPO train identically single-rank, TP=2, PP=2 and DP=2.

As in test_equivalence.py: one checkpoint of initial weights, loaded by every layout with
``init_from``, then 4 steps on the same global batches. Packed SFT micro-batches travel in
megatron-core's THD layout ([1, micro_batch x seq] between pipeline stages). Chosen and
rejected of a pair travel through the pipeline in one micro-batch; log-probabilities come
from megatron-core's vocab-parallel cross entropy, so TP must give the same numbers; the
loss is normalised by the pairs (SFT: loss tokens) of the global batch, so DP and
micro-batching must too. DPO's reference log-probabilities are computed by each layout
itself (its own copy of the data), so the forward-only reference pass is checked under
every layout as well: at step 1 policy = reference and the loss is ln 2.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import post_training_config, run_engine, step_metrics

LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tensor=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "dp2": (2, []),
}
REL_TOL = 1e-5
GRAD_REL_TOL = 1e-4
REWARD_ABS_TOL = 2e-5


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory, post_training_data):
    root = tmp_path_factory.mktemp("pref_eq")
    cfg = post_training_config(post_training_data, root / "init", "pretrain", "pretrain")
    run_engine(cfg, overrides=["training.steps=0"])
    return root, root / "init" / "checkpoints" / "iter_0000000"


def _run(objective, layout, root, init, data):
    nproc, overrides = LAYOUTS[layout]
    # A fresh directory per run: the single-rank reference runs once per parametrization.
    run_dir = Path(tempfile.mkdtemp(prefix=f"{objective}_{layout}_", dir=root))
    own = run_dir / "data"
    own.mkdir(parents=True)
    key = "sft" if objective == "sft" else "pref"
    src = data[key]
    for suffix in (".bin", ".idx", ".json", "_lossmask.bin", "_lossmask.idx", "_lossmask.json"):
        shutil.copy(src + suffix, str(own / key) + suffix)
    paths = dict(data, **{key: str(own / key)})
    cfg = post_training_config(paths, run_dir, objective, key)
    cfg["training"].update(steps=4, global_batch_size=8, micro_batch_size=2)
    cfg["optimizer"].update(lr=1e-3, min_lr=1e-4)
    cfg["checkpoint"].update(init_from=str(init), enabled=False)
    if objective == "sft":
        cfg["data"].update(packing=True, replay_paths=[data["pretrain"]], replay_ratio=0.3)
    run_engine(cfg, nproc=nproc, overrides=overrides)
    return step_metrics(run_dir)


def _close(a, b, tol):
    return abs(a - b) <= tol * abs(a)


# DPO in the default suite (preference pairs through the pipeline, the reference pass, ln 2 at
# step 1); SFT (packed, replay) and ORPO in the slow one (bash tests/run.sh -m slow).
ALL = ("tp2", "pp2", "dp2")


# DPO (its reference pass included) at PP=2 in the default suite (chosen and rejected cross
# the pipeline as one micro-batch); TP=2 and DP=2, and SFT and ORPO at every layout, in the
# slow one (TP=2 and DP=2 are compared in the default suite by the pretraining test).
@pytest.mark.parametrize(
    "objective,layouts",
    [
        pytest.param("sft", ALL, marks=pytest.mark.slow),
        pytest.param("orpo", ALL, marks=pytest.mark.slow),
        ("dpo", ("pp2",)),
        pytest.param("dpo", ("tp2", "dp2"), marks=pytest.mark.slow),
    ],
    ids=["sft", "orpo", "dpo", "dpo_tp2_dp2"],
)
def test_post_training_step_same_in_every_layout(objective, layouts, init_ckpt, post_training_data):
    root, init = init_ckpt
    ref = _run(objective, "single", root, init, post_training_data)
    assert len(ref) == 4
    if objective == "dpo":
        assert abs(ref[0]["loss"] - math.log(2.0)) < 1e-6, ref[0]["loss"]
    assert ref[-1]["loss"] != ref[0]["loss"]  # the weights really move
    for layout in layouts:
        got = _run(objective, layout, root, init, post_training_data)
        assert len(got) == 4, layout
        for step, (a, b) in enumerate(zip(ref, got), 1):
            where = (objective, layout, step)
            assert _close(a["loss"], b["loss"], REL_TOL), (*where, a["loss"], b["loss"])
            assert _close(a["grad_norm"], b["grad_norm"], GRAD_REL_TOL), (*where, a["grad_norm"], b["grad_norm"])
            if objective == "sft":
                assert a["tokens"] == b["tokens"], where  # the same loss tokens in every layout
                continue
            # Rewards are differences of fp32 log-prob sums of ~100 tokens (DPO: policy minus
            # reference): compare them with an absolute tolerance, not a relative one.
            for key in ("rewards/margins", "rewards/chosen"):
                assert abs(a[key] - b[key]) <= REWARD_ABS_TOL, (*where, key, a[key], b[key])
            assert a["rewards/accuracies"] == b["rewards/accuracies"], where
