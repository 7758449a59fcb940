"""SFT training samples: conversations (optionally packed several to a sequence) with a loss mask.

A conversation of ``L`` tokens gives ``L - 1`` positions: inputs ``t[:-1]``, labels ``t[1:]``,
loss mask ``mask[1:]`` (a position is trained on when the token it predicts is). Labels are
therefore shifted *per conversation*: the last token of one conversation never predicts the
first of the next.

Packing (``data.packing``): conversations are taken in a seeded shuffled order per epoch
and placed next-fit into sequences of ``data.seq_length`` positions. Position ids restart
at 0 for every conversation and for the padding after the last one; those restarts are the
segment boundaries that ``engine/data/packed_seq.py`` turns into megatron-core's THD
``PackedSeqParams``, so attention never crosses a conversation (TransformerEngine's fused
attention or ``models/attention.py``, segment by segment). RoPE positions restart per
segment; with learned absolute positions the restarted ids are what the model sees.
Padding forms its own segment with loss 0. Without packing each sample is one padded
conversation under plain causal attention.

Sample ``i`` is a pure function of (files, split, seed, sequence length, packing), so the
data position (consumed samples) resumes exactly at any world size.
"""

from __future__ import annotations

from typing import List, TypedDict

import numpy as np
import torch

from engine.data.chat_data import ChatIndexed


class SFTSample(TypedDict):
    """One packed SFT sequence (what :class:`SFTDataset` and the replay mixer yield)."""

    tokens: torch.Tensor  # int64 [seq_length]
    labels: torch.Tensor  # int64 [seq_length]
    loss_mask: torch.Tensor  # float32 [seq_length]
    position_ids: torch.Tensor  # int64 [seq_length], restarting at each packed document
    dataset_id: int


class SFTDataset(torch.utils.data.Dataset):
    """Documents ``[lo, hi)`` of an SFT prefix as ``num_samples`` training sequences."""

    def __init__(
        self,
        data: ChatIndexed,
        lo: int,
        hi: int,
        seq_length: int,
        num_samples: int,
        packing: bool,
        seed: int,
        pad_id: int,
        dataset_id: int = 0,
    ) -> None:
        if hi <= lo:
            raise ValueError(f"{data.prefix}: the split holds no conversations")
        self.data, self.lo, self.hi = data, lo, hi
        self.seq_length, self.packing, self.seed = seq_length, packing, seed
        self.pad_id, self.dataset_id = pad_id, dataset_id
        self.num_samples = num_samples
        # Positions (labels) per conversation; a conversation longer than the sequence
        # (data cut for a longer seq_length) is refused rather than silently truncated.
        lengths = data.seq_lengths[data.doc_index[lo:hi]].astype(np.int64) - 1
        if lengths.max() > seq_length:
            raise ValueError(
                f"{data.prefix} holds a conversation of {int(lengths.max()) + 1} tokens, longer than "
                f"data.seq_length + 1 = {seq_length + 1}; preprocess it with --seq-length {seq_length}"
            )
        self.positions = lengths
        self.loss_counts = data.doc_mask_counts(1)[lo:hi]
        self.bins: List[List[int]] = []
        self._epoch = 0
        self.ensure(num_samples)

    def ensure(self, n: int) -> None:
        """Lay out epochs until at least ``n`` samples exist (deterministic, append-only)."""
        while len(self.bins) < n:
            order = np.random.default_rng([self.seed, self._epoch]).permutation(self.hi - self.lo)
            self._epoch += 1
            if not self.packing:
                self.bins.extend([[int(d)] for d in order])
                continue
            current: List[int] = []
            used = 0
            for d in order.tolist():
                if current and used + self.positions[d] > self.seq_length:
                    self.bins.append(current)
                    current, used = [], 0
                current.append(d)
                used += int(self.positions[d])
            self.bins.append(current)

    def loss_tokens(self, i: int) -> int:
        """Tokens trained on in sample ``i`` (used by the replay mixer)."""
        self.ensure(i + 1)
        return int(sum(self.loss_counts[d] for d in self.bins[i]))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> SFTSample:
        self.ensure(int(i) + 1)
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        pos = 0
        for d in self.bins[int(i)]:
            ((toks, mask),) = self.data.document(self.lo + d)
            n = len(toks) - 1
            tokens[pos : pos + n] = toks[:-1]
            labels[pos : pos + n] = toks[1:]
            loss_mask[pos : pos + n] = mask[1:] > 0
            position_ids[pos : pos + n] = np.arange(n)
            pos += n
        position_ids[pos:] = np.arange(s - pos)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "dataset_id": self.dataset_id,
        }
