"""Which datasets feed which objective: a registry from ``Objective.data_kind`` to a builder.

A builder takes ``(cfg, train_samples, valid_samples)`` and returns ``TrainingData``: the
train and validation datasets (index-addressable, deterministic, yielding dicts that the
objective's ``forward_step`` understands) and the names of the blended sources, whose
realised token shares the loop logs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from engine.config import Config, ConfigError
from engine.data import gpt_data
from engine.data.chat_data import ChatIndexed, split_range
from engine.data.chat_template import get_chat_template
from engine.data.preference_data import PreferenceDataset
from engine.data.replay import ReplayMixture, interleave, replay_names
from engine.data.sft_data import SFTDataset
from engine.data.verify import verify_training_data
from engine.metrics import print_rank0


@dataclass
class TrainingData:
    """Datasets of one run."""

    train: object
    valid: object
    source_names: List[str]


def build_pretrain_data(cfg: Config, train_samples: int, valid_samples: int) -> TrainingData:
    """megatron-core GPTDataset / BlendedDataset over ``data.paths``."""
    train, valid, _ = gpt_data.build_datasets(cfg, train_samples, valid_samples)
    names = gpt_data.dataset_names(train)
    if cfg.data.blend:  # dataset_id follows the order of data.blend
        names = [entry.name or name for entry, name in zip(cfg.data.blend, names)]
    return TrainingData(train, valid, names)


DATA_BUILDERS: Dict[str, Callable[..., TrainingData]] = {"pretrain": build_pretrain_data}


def build_training_data(kind: str, cfg: Config, train_samples: int, valid_samples: int) -> TrainingData:
    """Datasets for an objective whose ``data_kind`` is ``kind``, after every file was checked
    against its index, its sidecar, the tokenizer and the model (:mod:`engine.data.verify`)."""
    verify_training_data(kind, cfg, gpt_data.token_ids(cfg).sha256, log=print_rank0)
    return DATA_BUILDERS[kind](cfg, train_samples, valid_samples)


def _chat_data(cfg: Config, kind: str):
    """The ``ChatIndexed`` of the single data path, checked against the config's template."""
    if len(cfg.data.paths) != 1:
        raise ConfigError(
            f"objective {cfg.objective.name!r} reads exactly one {kind} dataset in data.paths "
            f"(got {len(cfg.data.paths)}); merge them with `python -m engine data merge`"
        )
    try:
        data = ChatIndexed(cfg.data.paths[0], kind)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    want = get_chat_template(cfg.data.chat_template)
    if data.meta.get("chat_template_fingerprint") != want.fingerprint:
        raise ConfigError(
            f"{cfg.data.paths[0]} was written with chat template "
            f"{data.meta.get('chat_template')!r} but data.chat_template is {cfg.data.chat_template!r}"
        )
    return data


def _checked(cls, *args, **kwargs):
    """``cls(*args, **kwargs)``, its ValueError (an empty split, a conversation longer than
    data.seq_length) turned into a one-line ConfigError instead of a traceback."""
    try:
        return cls(*args, **kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_sft_data(cfg: Config, train_samples: int, valid_samples: int) -> TrainingData:
    """SFT conversations (packed or not), mixed with pretraining replay when
    ``data.replay_ratio`` > 0; validation is SFT data only."""
    d = cfg.data
    data = _chat_data(cfg, "sft")
    pad = gpt_data.token_ids(cfg).eod
    lo, hi = split_range(data.num_docs, d.split, 0)
    name = Path(d.paths[0]).name
    sft = _checked(SFTDataset, data, lo, hi, d.seq_length, train_samples, d.packing, d.seed, pad)
    valid = None
    if valid_samples:
        vlo, vhi = split_range(data.num_docs, d.split, 1)
        valid = _checked(SFTDataset, data, vlo, vhi, d.seq_length, valid_samples, d.packing, d.seed + 1, pad)
    if d.replay_ratio <= 0:
        return TrainingData(sft, valid, [name])
    source = interleave(sft.loss_tokens, d.seq_length, d.replay_ratio, train_samples, d.replay_by)
    num_replay = int(source.sum())
    replay_cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            d, paths=list(d.replay_paths), weights=list(d.replay_weights) if d.replay_weights else None
        ),
    )
    replay, _, _ = gpt_data.build_datasets(replay_cfg, max(num_replay, 1), 0)
    mixture = ReplayMixture(sft, replay, source, len(d.replay_paths))
    print_rank0(
        f"replay: {d.replay_ratio:.0%} of training by {'loss tokens' if d.replay_by == 'tokens' else 'samples'} "
        f"from {', '.join(d.replay_paths)} ({num_replay} of {train_samples} samples replayed)"
    )
    return TrainingData(mixture, valid, [name] + replay_names(gpt_data.dataset_names(replay)))


def build_preference_data(cfg: Config, train_samples: int, valid_samples: int) -> TrainingData:
    """Chosen/rejected pairs of the single preference dataset in ``data.paths``."""
    d = cfg.data
    data = _chat_data(cfg, "preference")
    pad = gpt_data.token_ids(cfg).eod
    lo, hi = split_range(data.num_docs, d.split, 0)
    train = _checked(PreferenceDataset, data, lo, hi, d.seq_length, train_samples, d.seed, pad)
    valid = None
    if valid_samples:
        vlo, vhi = split_range(data.num_docs, d.split, 1)
        # Validation reads the held-out pairs in order: the same pairs at every evaluation.
        valid = _checked(PreferenceDataset, data, vlo, vhi, d.seq_length, valid_samples, d.seed, pad, shuffle=False)
    return TrainingData(train, valid, [Path(d.paths[0]).name])


DATA_BUILDERS.update(sft=build_sft_data, preference=build_preference_data)
