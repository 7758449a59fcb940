"""Fixtures for the data-pipeline tests: tiny tokenizers trained once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_test_helpers import SAMPLE


def _train(tmp_path_factory, name: str, **kw) -> Path:
    from engine.data.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp(name)
    train_tokenizer([str(SAMPLE)], str(out), vocab_size=kw.pop("vocab_size", 1000), **kw)
    return out


@pytest.fixture(scope="session")
def unigram_dir(tmp_path_factory) -> Path:
    """A 1000-piece Unigram tokenizer trained on the sample (default settings)."""
    return _train(tmp_path_factory, "tok_unigram")


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> Path:
    """A 1000-piece BPE tokenizer trained on the sample."""
    return _train(tmp_path_factory, "tok_bpe", model_type="bpe")


@pytest.fixture(scope="session")
def sample_jsonl() -> Path:
    return SAMPLE
