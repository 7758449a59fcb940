"""Pretraining data: megatron-core GPTDataset / BlendedDataset over indexed ``.bin/.idx`` files,
and the sampler that turns "consumed samples" into this rank's micro-batches.

The data position of a run is one integer, the number of training samples consumed. The
datasets are deterministic functions of (files, split, seed, sequence length), so a resumed
run with the same integer sees exactly the batches the uninterrupted run would have seen,
whatever the world size.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, cast

import numpy as np
import torch

from engine.config import Config, ConfigError
from engine.data.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from megatron.core.datasets.megatron_dataset import MegatronDataset

log = logging.getLogger(__name__)


@dataclass
class TokenIds:
    """The tokenizer facts GPTDataset reads (``eod``, ``pad``, ``vocab_size``)."""

    eod: int
    pad: int
    vocab_size: int
    sha256: str = ""

    @property
    def unique_identifiers(self) -> Dict[str, object]:
        """Part of megatron-core's dataset cache key: a changed tokenizer rebuilds the indices."""
        return {
            "class": "TokenIds",
            "eod": self.eod,
            "pad": self.pad,
            "vocab_size": self.vocab_size,
            "sha256": self.sha256,
        }


def token_ids(cfg: Config) -> TokenIds:
    """Special ids from ``data.tokenizer`` (checked against ``model.vocab_size``)."""
    if cfg.data.tokenizer is None:
        return TokenIds(eod=cfg.data.eod_id, pad=cfg.data.eod_id, vocab_size=cfg.model.vocab_size)
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}; set model.vocab_size={tok.vocab_size}"
        )
    pad = tok.pad if tok.pad is not None and tok.pad >= 0 else tok.eod
    return TokenIds(eod=tok.eod, pad=pad, vocab_size=tok.vocab_size, sha256=getattr(tok, "sha256", ""))


def _split_fractions(split: str) -> List[float]:
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"data.split '{split}' must be numbers separated by commas, e.g. 98,1,1") from None
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    if any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"data.split '{split}' must be non-negative with a positive sum")
    return [p / sum(parts) for p in parts]


def check_split_sizes(cfg: Config, needed: Sequence[int]) -> None:
    """Refuse splits too small to hold one sequence (megatron-core 0.16.1 would loop forever).

    Mirrors how megatron-core cuts each dataset's documents into train/valid/test."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fractions = _split_fractions(cfg.data.split)
    names = ("train", "valid", "test")
    for prefix in cfg.data.paths:
        for ext in (".bin", ".idx"):
            if not Path(prefix + ext).exists():
                raise ConfigError(f"data.paths entry '{prefix}': {prefix + ext} does not exist")
        ds = IndexedDataset(prefix)
        lengths = ds.sequence_lengths
        n_docs = len(ds.document_indices) - 1
        bounds: List[float] = [0]
        for f in fractions:
            bounds.append(bounds[-1] + f)
        cut = [int(round(b * n_docs)) for b in bounds]
        cut[-1] = n_docs
        for i, name in enumerate(names):
            if needed[i] <= 0:
                continue
            docs = ds.document_indices[cut[i] : cut[i + 1] + 1]
            tokens = int(np.sum(lengths[docs[0] : docs[-1]])) if len(docs) > 1 else 0
            if tokens < cfg.data.seq_length + 1:
                raise ConfigError(
                    f"the {name} split of '{prefix}' holds {cut[i + 1] - cut[i]} documents / "
                    f"{tokens} tokens (data.split={cfg.data.split!r}), fewer than one sequence of "
                    f"data.seq_length+1 = {cfg.data.seq_length + 1} tokens; give it more data, "
                    f"shorten data.seq_length or change data.split"
                )


def drop_unused_splits(ds_config, sizes: Sequence[int]) -> None:
    """Build no dataset for a split nobody reads (0 samples requested).

    megatron-core 0.16.1 builds every split with a non-zero fraction; asked for 0 samples of a
    split that holds no token (10 documents at ``98,1,1``, one document at ``90,5,5``) its
    ``GPTDataset._get_num_epochs`` loops forever looking for the one extra token. A ``None``
    entry of the split matrix is the builder's own "not this split"; the other splits keep
    their document ranges, so the data a run trains on does not change."""
    ds_config.split_matrix = [None if not size else bounds for bounds, size in zip(ds_config.split_matrix, sizes)]


def build_datasets(cfg: Config, train_samples: int, valid_samples: int, test_samples: int = 0):
    """(train, valid, test) datasets over ``data.paths`` (or mock data), built from megatron-core
    one-epoch GPTDatasets chained by :class:`EpochChain` and blended by its BlendedDataset.

    Sample ``i`` of each split depends on the files, ``data.seed``, ``data.split`` and
    ``data.seq_length`` only, never on the requested sizes: a run extended to more steps reads,
    from its saved position on, exactly what the uninterrupted longer run would have read."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    ids = token_ids(cfg)
    sizes = [train_samples, valid_samples, test_samples]
    cache = cfg.data.cache_dir or str(Path(cfg.checkpoint.dir) / "data_cache")
    if cfg.data.mock:
        blend = None
    else:
        check_split_sizes(cfg, sizes)
        blend = (list(cfg.data.paths), list(cfg.data.weights) if cfg.data.weights else None)
    ds_config = GPTDatasetConfig(
        random_seed=cfg.data.seed,
        sequence_length=cfg.data.seq_length,
        blend=blend,
        split=cfg.data.split,
        path_to_cache=cache,
        tokenizer=ids,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    drop_unused_splits(ds_config, sizes)
    cls = MockGPTDataset if cfg.data.mock else GPTDataset
    prefixes = [None] if cfg.data.mock else list(cfg.data.paths)
    lows = [cls.build_low_level_dataset(p, ds_config) for p in prefixes]
    out: List[Optional[torch.utils.data.Dataset]] = []
    for split_id, (bounds, size) in enumerate(zip(ds_config.split_matrix, sizes)):
        if bounds is None:
            out.append(None)
            continue
        chains = [
            EpochChain(cls, low, p, _split_indices(cls.numel_low_level_dataset(low), bounds), split_id, ds_config)
            for p, low in zip(prefixes, lows)
        ]
        if len(chains) == 1:
            chains[0].extend(size)
            out.append(chains[0])
        else:
            out.append(_blend(chains, cfg.data.weights, size, ds_config))
    return out


def _split_indices(num_elements: int, bounds) -> np.ndarray:
    """Sequence indices of one split, cut as megatron-core's builder cuts them."""
    beg, end = int(round(bounds[0] * float(num_elements))), int(round(bounds[1] * float(num_elements)))
    return np.arange(beg, end, 1, dtype=np.int32)


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of epoch ``epoch``: ``seed`` for the first (megatron-core's own one-epoch
    order), a SeedSequence draw from ``(seed, epoch)`` after it."""
    if epoch == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class EpochChain(torch.utils.data.Dataset):
    """One split of one dataset as a sequence of epochs, each a one-epoch megatron-core dataset.

    megatron-core shuffles all the epochs a run asks for as one permutation (and separates a
    short final epoch), so its order is a function of the requested sample count. Here epoch
    ``e`` is its own ``GPTDataset`` built with ``num_samples=None`` (exactly one epoch, cached
    by megatron-core under its own key) and seed :func:`epoch_seed` ``(data.seed, e)``; sample
    ``i`` is therefore the same whatever total is requested. Each epoch drops its last partial
    sequence (fewer than ``seq_length`` tokens) instead of continuing it into the next."""

    def __init__(self, cls, low_level, dataset_path: Optional[str], indices: np.ndarray, split_id: int, config) -> None:
        from megatron.core.datasets.utils import Split

        self.cls, self.low_level, self.dataset_path, self.indices = cls, low_level, dataset_path, indices
        self.index_split = Split(split_id)
        self.config = config
        self.epochs: List[MegatronDataset] = []
        self.ends: List[int] = []  # cumulative sample counts after each epoch
        self._add_epoch()
        # BlendedDataset keys its cache on this; the first epoch's identifiers name the data,
        # split, seed and length, "epochs" the rule that derives the later ones.
        self.unique_identifiers = {
            "class": "EpochChain",
            "epochs": "one-epoch GPTDatasets, seed epoch_seed(seed, e)",
            "first_epoch": self.epochs[0].unique_identifiers,
        }

    def _add_epoch(self) -> None:
        import dataclasses

        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

        e = len(self.epochs)
        config = (
            self.config
            if e == 0
            else dataclasses.replace(self.config, random_seed=epoch_seed(self.config.random_seed, e))
        )
        # build_generic_dataset: rank 0 writes the index cache, the others read it after a barrier.
        ds = BlendedMegatronDatasetBuilder.build_generic_dataset(
            self.cls,
            lambda: True,
            True,
            self.low_level,
            self.dataset_path,
            self.indices,
            None,
            self.index_split,
            config,
        )
        # cast: build_generic_dataset is typed for every kind of dataset (and None for a rank that
        # builds nothing); with a MegatronDataset class, built on every rank, it returns an instance.
        self.epochs.append(cast("MegatronDataset", ds))
        self.ends.append((self.ends[-1] if self.ends else 0) + len(ds))

    @property
    def epoch_length(self) -> int:
        """Samples in one epoch."""
        return self.ends[0]

    def extend(self, num_samples: int) -> None:
        """Build epochs until at least ``num_samples`` samples exist (collective on every rank)."""
        if num_samples > 0 and self.epoch_length == 0:
            raise ConfigError(
                f"the {self.index_split.name} split of {self.dataset_path or 'the mock data'} "
                f"holds no sequence of data.seq_length tokens"
            )
        while self.ends[-1] < num_samples:
            self._add_epoch()

    def __len__(self) -> int:
        return self.ends[-1]

    def __getitem__(self, i: int) -> Dict:
        i = int(i)
        e = bisect.bisect_right(self.ends, i)
        if e >= len(self.epochs):
            raise IndexError(f"sample {i} of {len(self)}")
        return self.epochs[e][i - (self.ends[e - 1] if e else 0)]


def _blend(chains: List[EpochChain], weights: Optional[Sequence[float]], size: int, config):
    """megatron-core's BlendedDataset of ``size`` samples over ``chains``.

    Its greedy blending index is prefix-stable for fixed weights, so the weights are the
    configured ones or, for None, the chains' one-epoch lengths (not megatron's "all the
    samples built", which grows with the run). Each chain is extended to what the index draws."""
    from megatron.core.datasets import helpers
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.utils import normalize

    w = [float(x) for x in weights] if weights else [float(c.epoch_length) for c in chains]
    index = np.zeros(size, dtype=np.int16)
    helpers.build_blending_indices(index, np.zeros(size, dtype=np.int64), normalize(w), len(chains), size, False)
    for chain, count in zip(chains, np.bincount(index, minlength=len(chains)).tolist()):
        chain.extend(count)
    return BlendedMegatronDatasetBuilder.build_generic_dataset(
        BlendedDataset, lambda: True, True, chains, w, size, config
    )


class MicroBatchSampler:
    """Yields this data-parallel rank's micro-batch sample indices from ``consumed_samples`` on.

    Each global batch is read in groups of ``micro_batch_size x dp_size`` consecutive
    samples; rank r takes the r-th slice of each group (megatron's pretraining sampler)."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total = total_samples
        self.start = consumed_samples
        self.mbs = micro_batch_size
        self.rank = dp_rank
        self.dp = dp_size

    def __iter__(self) -> Iterator[List[int]]:
        group = self.mbs * self.dp
        for first in range(self.start, self.total - group + 1, group):
            lo = first + self.rank * self.mbs
            yield list(range(lo, lo + self.mbs))

    def __len__(self) -> int:
        return max(0, (self.total - self.start) // (self.mbs * self.dp))


def _collate(samples: List[Dict]) -> Dict[str, torch.Tensor]:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        else:
            out[key] = torch.as_tensor(np.asarray(values))
    return out


def micro_batches(
    dataset, sampler: MicroBatchSampler, num_workers: int = 0, device: Optional[torch.device] = None
) -> Iterator[Dict[str, torch.Tensor]]:
    """Iterator of collated micro-batches (dicts of tensors on ``device``, default CPU) in sampler order."""
    device = device or torch.device("cpu")
    on_gpu = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
        pin_memory=on_gpu,
    )
    if not on_gpu:
        return iter(loader)
    return ({k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in loader)


def dataset_names(dataset) -> List[str]:
    """Names (file prefixes) of the datasets a (blended) dataset draws from, by dataset_id."""
    inner = getattr(dataset, "datasets", None)
    if inner is None:
        return [Path(getattr(dataset, "dataset_path", "data") or "data").name]
    return [Path(getattr(d, "dataset_path", f"ds{i}") or f"ds{i}").name for i, d in enumerate(inner)]
