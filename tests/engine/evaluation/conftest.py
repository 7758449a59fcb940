"""Checkpoints the evaluation tests share: a trained tiny-llama run, and a run of two
checkpoints (iteration 1: those weights; iteration 2: the same weights perturbed)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import pytest
import torch


@pytest.fixture(scope="session")
def two_checkpoints(trained_checkpoint, tmp_path_factory) -> Tuple[Path, Path, Path]:
    """``(run_dir, iter_1, iter_2)`` of tiny-llama (vocab 1024, trained 3 steps): two
    checkpoints of the same architecture with different weights."""
    from engine.model_io import load_model, save_model_checkpoint

    loaded = load_model(trained_checkpoint("tiny-llama"))
    run = tmp_path_factory.mktemp("eval") / "run"
    first = save_model_checkpoint(run, loaded.cfg, loaded.chunks, iteration=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    second = save_model_checkpoint(run, loaded.cfg, loaded.chunks, iteration=2)
    return run, first, second
