"""Pretraining replay mixed into SFT: a deterministic interleave with a target share.

The seed run drew a coin per micro-batch, so the real share drifted far from its 30% and
was never logged. Here sample ``i`` of the mixture is decided once, up front, by a greedy
rule: take the source (SFT or replay) that brings the realised share of *loss tokens*
(``data.replay_by: tokens``, the default) or of samples (``samples``) closest to
``data.replay_ratio``. A replayed sample is a pretraining sequence with a full loss mask
(``seq_length`` loss tokens); an SFT sample counts the tokens its mask trains on. After
``n`` samples the realised share is off the target by at most one sample's tokens over
the total, so it converges as the run goes on (checked by the tests to stay within 1%).

The interleave depends only on (data, seed, sequence length, ratio, run length), never on
the world size, so consumed-samples resume stays exact. Source ids: 0 is the SFT data,
``1 + j`` the j-th replay dataset (the loop logs ``share/<name>`` per id).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import numpy as np
import torch

if TYPE_CHECKING:
    from engine.data.sft_data import SFTSample


def interleave(sft_tokens, replay_tokens: int, ratio: float, num_samples: int, by: str = "tokens") -> np.ndarray:
    """Source of each of ``num_samples`` samples: 0 SFT, 1 replay.

    ``sft_tokens(k)`` gives the loss tokens of the k-th SFT sample; a replay sample has
    ``replay_tokens``. With ``by="samples"`` every sample counts 1."""
    source = np.zeros(num_samples, dtype=np.int8)
    rep = tot = 0.0
    k = 0
    for i in range(num_samples):
        s = 1.0 if by == "samples" else float(sft_tokens(k))
        r = 1.0 if by == "samples" else float(replay_tokens)
        err_sft = abs(rep - ratio * (tot + s))
        err_rep = abs(rep + r - ratio * (tot + r))
        if ratio > 0 and (ratio >= 1 or err_rep < err_sft):
            source[i] = 1
            rep += r
            tot += r
        else:
            k += 1
            tot += s
    return source


class ReplayMixture(torch.utils.data.Dataset):
    """SFT samples and replayed pretraining samples in a fixed interleave."""

    def __init__(self, sft, replay, source: np.ndarray, num_replay_sources: int):
        self.sft, self.replay, self.source = sft, replay, source
        # The n-th sample of a source is that source's n-th sample: a running count.
        self.index = np.zeros(len(source), dtype=np.int64)
        counts = [0, 0]
        for i, s in enumerate(source.tolist()):
            self.index[i] = counts[s]
            counts[s] += 1
        self.num_sft, self.num_replay = counts
        self.num_replay_sources = num_replay_sources

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> SFTSample:
        i = int(i)
        if self.source[i] == 0:
            return self.sft[int(self.index[i])]
        item = self.replay[int(self.index[i])]
        tokens = item["tokens"].to(torch.int64)
        return {
            "tokens": tokens,
            "labels": item["labels"].to(torch.int64),
            # Replay trains on every token (megatron's GPTDataset would zero labels equal to its pad id).
            "loss_mask": torch.ones(tokens.shape, dtype=torch.float32),
            "position_ids": item["position_ids"].to(torch.int64),
            "dataset_id": 1 + int(item.get("dataset_id", 0)),
        }


def replay_names(names: List[str]) -> List[str]:
    """Log names of the replay sources."""
    return [f"replay:{n}" for n in names]
