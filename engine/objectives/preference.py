"""What ORPO and DPO share: a micro-batch of pairs through the model, and per-pair log-probs.

A micro-batch of ``b`` samples is ``[b, 2, s]`` (chosen, rejected); it is flattened to
``[2b, s]`` so both members of a pair pass through every pipeline stage together
(``sequences_per_sample = 2``). Given labels, megatron-core's ``GPTModel`` returns the
per-token loss from vocab-parallel cross entropy in fp32, whose negation is the per-token
log-probability, exact under tensor parallelism. Losses are summed over pairs and
normalised by the pairs of the global batch (``num_units`` = pairs).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Tuple

import torch

from engine.objectives.base import Objective
from engine.objectives.preference_losses import masked_logp_sums


class PreferenceObjective(Objective):
    """Base of pairwise objectives: subclasses turn per-pair log-probs into terms."""

    data_kind = "preference"
    sequences_per_sample = 2
    log_keys: Tuple[str, ...] = ("rewards/accuracies", "rewards/margins")

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        s = batch["tokens"].shape[-1]
        flat = {k: batch[k].reshape(-1, s) for k in ("tokens", "labels", "position_ids")}
        output = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"])
        return output, partial(self.loss_func, batch)

    def loss_func(self, batch: Dict[str, torch.Tensor], output: torch.Tensor):
        """(loss summed over pairs, pairs, metric sums) of one micro-batch."""
        b, _, s = batch["tokens"].shape
        per_token = output.float().reshape(b, 2, s)
        logp_sum, count = masked_logp_sums(per_token, batch["loss_mask"])
        loss, metrics = self.pair_loss(batch, per_token, logp_sum, count)
        metrics["pairs"] = torch.tensor(float(b), dtype=torch.float64)
        metrics["loss_sum"] = loss.detach().sum()
        return loss.sum().float(), torch.tensor(b, dtype=torch.int), metrics

    def pair_loss(self, batch, per_token, logp_sum, count):
        """Per-pair loss [b] (float64, differentiable) and metric sums."""
        raise NotImplementedError
