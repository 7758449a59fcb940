"""Preference training samples: one chosen/rejected pair per sample, both sequences together.

Sample ``i`` is pair ``order[i]`` of a seeded per-epoch permutation of the split's pairs.
It holds ``[2, seq_length]`` tensors (row 0 chosen, row 1 rejected), so one micro-batch of
``b`` samples always carries whole pairs through the pipeline (``sequences_per_sample`` =
2; the objective flattens them to ``[2b, s]``). ``loss_mask`` marks the response tokens
(label positions whose target is a response token), ``nll_mask`` the prompt and response
tokens (ORPO's NLL term with the prompt included), ``pair_index`` the pair's document in
the prefix (where DPO looks up its stored reference log-probabilities).
"""

from __future__ import annotations

from typing import Dict, TypedDict

import numpy as np
import torch

from engine.data.chat_data import RESPONSE, ChatIndexed


class PreferenceSample(TypedDict):
    """One preference pair: row 0 the chosen, row 1 the rejected sequence."""

    tokens: torch.Tensor  # int64 [2, seq_length]
    labels: torch.Tensor  # int64 [2, seq_length]
    loss_mask: torch.Tensor  # float32 [2, seq_length], the response tokens
    nll_mask: torch.Tensor  # float32 [2, seq_length], every trained token
    position_ids: torch.Tensor  # int64 [2, seq_length]
    pair_index: int


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs ``[lo, hi)`` of a preference prefix as ``num_samples`` samples.

    ``shuffle=False`` reads the pairs in order (the reference log-probability pass)."""

    def __init__(
        self,
        data: ChatIndexed,
        lo: int,
        hi: int,
        seq_length: int,
        num_samples: int,
        seed: int,
        pad_id: int,
        shuffle: bool = True,
    ) -> None:
        if hi <= lo:
            raise ValueError(f"{data.prefix}: the split holds no pairs")
        longest = int(data.seq_lengths.max()) - 1
        if longest > seq_length:
            raise ValueError(
                f"{data.prefix} holds a sequence of {longest + 1} tokens, longer than "
                f"data.seq_length + 1 = {seq_length + 1}; preprocess it with --seq-length {seq_length}"
            )
        self.data, self.lo, self.hi = data, lo, hi
        self.seq_length, self.num_samples, self.seed = seq_length, num_samples, seed
        self.pad_id, self.shuffle = pad_id, shuffle
        self._orders: Dict[int, np.ndarray] = {}

    def pair_of(self, i: int) -> int:
        """Document (pair) index in the prefix of sample ``i``."""
        n = self.hi - self.lo
        epoch, k = divmod(int(i), n)
        if not self.shuffle:
            return self.lo + k
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self.lo + int(self._orders[epoch][k])

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> PreferenceSample:
        pair = self.pair_of(i)
        s = self.seq_length
        tokens = np.full((2, s), self.pad_id, dtype=np.int64)
        labels = np.full((2, s), self.pad_id, dtype=np.int64)
        loss_mask = np.zeros((2, s), dtype=np.float32)
        nll_mask = np.zeros((2, s), dtype=np.float32)
        for row, (toks, mask) in enumerate(self.data.document(pair)):
            n = len(toks) - 1
            tokens[row, :n], labels[row, :n] = toks[:-1], toks[1:]
            loss_mask[row, :n] = mask[1:] == RESPONSE
            nll_mask[row, :n] = mask[1:] > 0
        position_ids = np.broadcast_to(np.arange(s, dtype=np.int64), (2, s)).copy()
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "nll_mask": torch.from_numpy(nll_mask),
            "position_ids": torch.from_numpy(position_ids),
            "pair_index": pair,
        }
