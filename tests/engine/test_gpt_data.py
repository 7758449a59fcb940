"""Pretraining datasets through megatron-core's builder: blend weights, split checks, sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.config import ConfigError
from engine.data.gpt_data import MicroBatchSampler, build_datasets
from engine.run_config import load_run_config
from tests.conftest import write_synthetic_dataset


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, megatron_single_rank):
    d = tmp_path_factory.mktemp("blend")
    return str(write_synthetic_dataset(d / "a", 300, seed=1)), str(write_synthetic_dataset(d / "b", 300, seed=2))


def _cfg(tmp_path, paths, *extra):
    return load_run_config(
        None,
        [
            f"data.paths={paths}",
            "data.seq_length=32",
            "model.preset=tiny-llama",
            f"data.cache_dir={tmp_path}/cache",
            *extra,
        ],
    )


def test_blend_weights_are_honoured_within_one_percent(tmp_path, two_datasets):
    a, b = two_datasets
    cfg = _cfg(tmp_path, f"[{a},{b}]", "data.weights=[0.7,0.3]", "data.split=100,0,0")
    train, _, _ = build_datasets(cfg, 4000, 0)
    counts = Counter(int(train[i]["dataset_id"]) for i in range(4000))
    assert abs(counts[0] / 4000 - 0.7) < 0.01 and abs(counts[1] / 4000 - 0.3) < 0.01, counts


def test_samples_are_windows_of_the_documents(tmp_path, two_datasets):
    a, _ = two_datasets
    cfg = _cfg(tmp_path, f"[{a}]", "data.split=100,0,0")
    train, _, _ = build_datasets(cfg, 50, 0)
    s = train[0]
    assert s["tokens"].shape == (32,) and s["labels"].shape == (32,)
    assert np.array_equal(s["tokens"][1:].numpy(), s["labels"][:-1].numpy())  # next-token labels


def test_too_small_split_is_a_clear_error(tmp_path):
    prefix = write_synthetic_dataset(tmp_path / "small", 30)
    cfg = _cfg(tmp_path, f"[{prefix}]", "data.split=98,1,1", "data.seq_length=256", "model.max_seq_length=256")
    with pytest.raises(
        ConfigError,
        match=r"the valid split of .* holds 1 documents / \d+ tokens .*fewer than one sequence of data.seq_length\+1 = 257",
    ):
        build_datasets(cfg, 100, 10)


def test_missing_files_are_named(tmp_path):
    cfg = _cfg(tmp_path, f"[{tmp_path}/nothing]")
    with pytest.raises(ConfigError, match=r"nothing.bin does not exist"):
        build_datasets(cfg, 10, 0)


def test_sampler_splits_global_batches_over_data_parallel_ranks():
    # global batch 8 = micro 2 x dp 2 x 2 micro-batches; starting after 8 consumed samples
    seen = []
    for rank in range(2):
        seen += [i for mb in MicroBatchSampler(24, 8, 2, rank, 2) for i in mb]
    assert sorted(seen) == list(range(8, 24))  # every sample once, none before the position
    assert list(MicroBatchSampler(16, 8, 2, 1, 2)) == [[10, 11], [14, 15]]


@pytest.fixture(scope="module")
def small_datasets(tmp_path_factory, megatron_single_rank):
    """Two ~30-document datasets: one epoch is ~100 sequences of 32 tokens, so runs cross several."""
    d = tmp_path_factory.mktemp("epochs")
    return str(write_synthetic_dataset(d / "a", 30, seed=3)), str(write_synthetic_dataset(d / "b", 20, seed=4))


def _token_rows(ds, n):
    return [ds[i]["tokens"].numpy().tobytes() + bytes([int(ds[i].get("dataset_id", 0))]) for i in range(n)]


@pytest.mark.parametrize("weights", [None, "[0.6,0.4]"])
def test_sample_order_does_not_depend_on_the_requested_length(tmp_path, small_datasets, weights):
    # megatron-core shuffles all requested epochs at once: asking for more samples (a run
    # extended with a larger training.steps) used to reorder the samples already consumed.
    a, b = small_datasets
    extra = [f"data.weights={weights}"] if weights else []
    cfg = _cfg(tmp_path, f"[{a},{b}]", "data.split=100,0,0", *extra)
    short, _, _ = build_datasets(cfg, 300, 0)
    long, _, _ = build_datasets(cfg, 1200, 0)
    first = short.datasets[0]
    assert len(first.epochs) >= 2 and len(long.datasets[0].epochs) > len(first.epochs)  # epochs crossed
    assert _token_rows(short, 300) == _token_rows(long, 300)


def test_single_dataset_order_is_stable_and_each_epoch_visits_every_document(tmp_path, small_datasets):
    a, _ = small_datasets
    cfg = _cfg(tmp_path, f"[{a}]", "data.split=100,0,0")
    short, _, _ = build_datasets(cfg, 150, 0)
    long, _, _ = build_datasets(cfg, 500, 0)
    assert _token_rows(short, 150) == _token_rows(long, 150)
    docs = [np.asarray(e.document_index) for e in long.epochs]
    assert len(docs) >= 3 and all(sorted(d.tolist()) == list(range(30)) for d in docs)  # each doc once per epoch
    assert not np.array_equal(docs[0], docs[1])  # in a fresh order
