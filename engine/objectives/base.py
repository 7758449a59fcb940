"""The objective interface the training loop calls."""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch


class Objective:
    """Batch -> loss and metrics, in megatron-core's forward-step contract.

    ``forward_step(data_iterator, model)`` returns ``(output, loss_func)``; on the last
    pipeline stage megatron-core calls ``loss_func(output)``, which returns
    ``(loss_sum, num_tokens, metrics)``: the loss *summed* over this micro-batch's valid
    tokens, their count (megatron-core divides the gradients by the global count), and a
    dict of tensors to be summed over micro-batches and data-parallel ranks.
    ``finalize_metrics`` turns those sums into the numbers that get logged."""

    name = "objective"

    def forward_step(self, data_iterator, model) -> Tuple[torch.Tensor, Callable]:
        raise NotImplementedError

    def finalize_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Logged metrics from the summed metric tensors of one global batch."""
        raise NotImplementedError
