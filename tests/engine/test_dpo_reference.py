"""DPO's stored reference log-probs are keyed on content: rewritten data or a reference retrained
in place recomputes them (step 1's loss is ln 2 with policy == reference), and the cache
directory is configurable, falling back from a read-only data directory."""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.objectives import reference as refmod
from engine.run_config import load_run_config
from tests.conftest import losses, post_training_config, run_engine

LN2 = math.log(2.0)
SUFFIXES = (".bin", ".idx", ".json", "_lossmask.bin", "_lossmask.idx", "_lossmask.json")


def _copy_data(src: str, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    for s in SUFFIXES:
        shutil.copyfile(src + s, str(dst) + s)
    return str(dst)


def _swapped(paths, out: Path) -> str:
    """The preference data with chosen and rejected exchanged (same pairs, other bytes)."""
    from engine.data.preprocess import preprocess

    raw = Path(paths["pref"]).parent.parent / "raw" / "preference.jsonl"
    rows = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / "swapped.jsonl"
    src.write_text("".join(json.dumps(dict(r, chosen=r["rejected"], rejected=r["chosen"])) + "\n" for r in rows))
    preprocess([str(src)], paths["tokenizer"], str(out), kind="preference", seq_length=128, progress=False)
    return str(out)


def _dpo(paths, run_dir: Path, prefix: str, ref: Path, **objective) -> float:
    cfg = post_training_config(paths, run_dir, "dpo", "pref")
    cfg["data"]["paths"] = [prefix]
    cfg["training"].update(steps=1, global_batch_size=8, micro_batch_size=4)
    cfg["objective"]["dpo"] = objective
    cfg["checkpoint"]["init_from"] = str(ref)
    run_engine(cfg)
    return losses(run_dir)[0]


def _checkpoint(paths, run_dir: Path, seed: int) -> Path:
    cfg = post_training_config(paths, run_dir, "pretrain", "pretrain")
    cfg["training"].update(steps=4, seed=seed)
    run_engine(cfg)
    return sorted((run_dir / "checkpoints").glob("iter_*"))[-1]


@pytest.fixture(scope="module")
def references(tmp_path_factory, post_training_data):
    """Two reference checkpoints of the same iteration (4 pretraining steps) with different weights
    (other initialisation seeds): what retraining a reference in place looks like."""
    root = tmp_path_factory.mktemp("dpo_refs")
    return _checkpoint(post_training_data, root / "a", 1), _checkpoint(post_training_data, root / "b", 2)


def test_rewritten_data_under_the_same_prefix_recomputes(tmp_path, post_training_data, references):
    d, (ref, _) = post_training_data, references
    prefix = _copy_data(d["pref"], tmp_path / "data" / "pref")
    assert _dpo(d, tmp_path / "run1", prefix, ref) == pytest.approx(LN2, abs=1e-5)
    swapped = _swapped(d, tmp_path / "build" / "pref")
    for s in SUFFIXES:  # rewrite the dataset in place
        shutil.copyfile(swapped + s, prefix + s)
    # Stale values (the unswapped pairs' reference) would put step 1 far from ln 2.
    assert _dpo(d, tmp_path / "run2", prefix, ref) == pytest.approx(LN2, abs=1e-5)
    assert len(list((tmp_path / "data").glob("pref_reflogps_*.npy"))) == 2


@pytest.mark.slow  # the key covering the weights: test_key_changes_with_bytes_rewritten_in_place
def test_reference_retrained_in_place_recomputes_into_the_configured_dir(tmp_path, post_training_data, references):
    d, (first, retrained) = post_training_data, references
    ref = tmp_path / "ref" / "iter_0000004"
    shutil.copytree(first, ref)
    cache = tmp_path / "cache"
    assert _dpo(d, tmp_path / "run1", d["pref"], ref, reference_cache_dir=str(cache)) == pytest.approx(LN2, abs=1e-5)
    shutil.rmtree(ref)
    shutil.copytree(retrained, ref)  # same path and iteration, other weights
    assert _dpo(d, tmp_path / "run2", d["pref"], ref, reference_cache_dir=str(cache)) == pytest.approx(LN2, abs=1e-5)
    assert len(list(cache.glob("pref_reflogps_*.npy"))) == 2


def _cfg(tmp_path, d, *extra):
    return load_run_config(
        None,
        [
            f"data.paths=[{d['pref']}]",
            f"data.tokenizer={d['tokenizer']}",
            "model.vocab_size=1024",
            "data.seq_length=128",
            "objective.name=dpo",
            f"checkpoint.dir={tmp_path}/run",
            *extra,
        ],
    )


def test_read_only_data_dir_falls_back_to_the_run_dir(tmp_path, post_training_data, references, monkeypatch):
    d = post_training_data
    cfg = _cfg(tmp_path, d)
    key = refmod.reference_key(cfg, d["pref"], references[0], 0)
    data_dir = str(Path(d["pref"]).resolve().parent)
    real_access = refmod.os.access
    # Tests run as root, where chmod 0555 does not stop writes: deny the data dir through os.access.
    monkeypatch.setattr(refmod.os, "access", lambda p, mode: False if str(p) == data_dir else real_access(p, mode))
    found, target = refmod._locate(cfg, d["pref"], key)
    assert found is None and target.parent == tmp_path / "run" / "reference_cache"


def test_unwritable_cache_dir_is_refused_before_the_reference_pass(tmp_path, post_training_data, references):
    d = post_training_data
    (tmp_path / "file").write_text("")
    cfg = _cfg(
        tmp_path, d, f"objective.dpo.reference_cache_dir={tmp_path}/file/cache", f"checkpoint.init_from={references[0]}"
    )
    trainer = types.SimpleNamespace(cfg=cfg, state=types.SimpleNamespace(iteration=0))  # no model: no pass possible
    with pytest.raises(ConfigError, match=r"cannot store reference log-probs: .*file/cache is not writable"):
        refmod.load_or_compute_reference(trainer, None)


def test_key_changes_with_bytes_rewritten_in_place(tmp_path, post_training_data, references):
    d = post_training_data
    cfg = _cfg(tmp_path, d)
    prefix = _copy_data(d["pref"], tmp_path / "data" / "pref")
    before = refmod.reference_key(cfg, prefix, references[0], 0)
    with open(prefix + "_lossmask.bin", "r+b") as f:  # same size, one mask byte flipped
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    assert refmod.reference_key(cfg, prefix, references[0], 0)["data"] != before["data"]
    assert before["reference"] != refmod.reference_key(cfg, prefix, references[1], 0)["reference"]
