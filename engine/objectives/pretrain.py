"""Next-token prediction on every token of the sequence (masked by ``loss_mask``)."""

from __future__ import annotations

import math
from functools import partial
from typing import Dict

import torch

from engine.objectives.base import Objective


class PretrainObjective(Objective):
    """Causal LM loss, normalised by the number of valid tokens in the global batch."""

    name = "pretrain"

    def model_inputs(self, batch):
        """``(tokens, labels, position_ids, packed_seq_params)`` the model is called with."""
        return batch["tokens"], batch["labels"], batch["position_ids"], None

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        tokens, labels, position_ids, packed = self.model_inputs(batch)
        # Given labels, GPTModel returns the per-token loss [b, s] from vocab-parallel
        # cross entropy in fp32 (exact under tensor parallelism).
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed)
        return output, partial(self.loss_func, batch["loss_mask"].float(), batch.get("dataset_id"))

    def loss_func(self, loss_mask: torch.Tensor, dataset_id, output: torch.Tensor):
        """Summed masked loss, valid-token count and metric sums of one micro-batch."""
        losses = output.float().reshape(loss_mask.shape)  # [1, b*s] when packed (THD)
        loss_sum = (losses * loss_mask).sum()
        num_tokens = loss_mask.sum().to(torch.int)
        metrics = {"loss_sum": loss_sum.detach().clone(), "tokens": loss_mask.sum().detach()}
        metrics.update(self.dataset_token_counts(dataset_id, loss_mask))
        return loss_sum, num_tokens, metrics

    def finalize_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        tokens = max(sums.get("tokens", 0.0), 1.0)
        loss = sums.get("loss_sum", float("nan")) / tokens
        out = {"loss": loss, "tokens": sums.get("tokens", 0.0)}
        out["ppl"] = math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan")
        return out
