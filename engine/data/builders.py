"""Which datasets feed which objective: a registry from ``Objective.data_kind`` to a builder.

A builder takes ``(cfg, train_samples, valid_samples)`` and returns ``TrainingData``: the
train and validation datasets (index-addressable, deterministic, yielding dicts that the
objective's ``forward_step`` understands) and the names of the blended sources, whose
realised token shares the loop logs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

from engine.data import gpt_data


@dataclass
class TrainingData:
    """Datasets of one run."""

    train: object
    valid: object
    source_names: List[str]


def build_pretrain_data(cfg, train_samples: int, valid_samples: int) -> TrainingData:
    """megatron-core GPTDataset / BlendedDataset over ``data.paths``."""
    train, valid, _ = gpt_data.build_datasets(cfg, train_samples, valid_samples)
    return TrainingData(train, valid, gpt_data.dataset_names(train))


DATA_BUILDERS: Dict[str, Callable[..., TrainingData]] = {"pretrain": build_pretrain_data}


def build_training_data(kind: str, cfg, train_samples: int, valid_samples: int) -> TrainingData:
    """Datasets for an objective whose ``data_kind`` is ``kind``."""
    return DATA_BUILDERS[kind](cfg, train_samples, valid_samples)
