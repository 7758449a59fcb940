"""Pretraining datasets through megatron-core's builder: blend weights, split checks, sampler."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.config import ConfigError, load_config
from engine.data.gpt_data import MicroBatchSampler, build_datasets
from tests.conftest import write_synthetic_dataset


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, megatron_single_rank):
    d = tmp_path_factory.mktemp("blend")
    return str(write_synthetic_dataset(d / "a", 300, seed=1)), str(write_synthetic_dataset(d / "b", 300, seed=2))


def _cfg(tmp_path, paths, *extra):
    return load_config(None, [f"data.paths={paths}", "data.seq_length=32", "model.preset=tiny-llama",
                              f"data.cache_dir={tmp_path}/cache", *extra])


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
    cfg = _cfg(tmp_path, f"[{prefix}]", "data.split=98,1,1", "data.seq_length=256",
               "model.max_seq_length=256")
    with pytest.raises(ConfigError, match=r"the valid split of .* holds 1 documents / \d+ tokens .*fewer than one sequence of data.seq_length\+1 = 257"):
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
