"""The objective interface the training loop calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch

from engine.config import Config

if TYPE_CHECKING:  # the trainer imports the objectives; only the annotation names it
    from engine.trainer import Trainer


class Objective:
    """Batch -> loss and metrics, in megatron-core's forward-step contract.

    ``forward_step(data_iterator, model)`` returns ``(output, loss_func)``; on the last
    pipeline stage megatron-core calls ``loss_func(output)``, which returns
    ``(loss_sum, num_units, metrics)``: the loss *summed* over this micro-batch (over valid
    tokens, or pairs), the count it is to be normalised by (megatron-core divides the
    gradients by the global count), and a dict of scalar tensors named in
    ``metric_names`` that the loop sums over micro-batches and data-parallel ranks.
    ``finalize_metrics`` turns those sums into the numbers that get logged."""

    name = "objective"
    data_kind = "pretrain"
    """Which data builder feeds this objective (``engine.data.builders.DATA_BUILDERS``)."""
    metric_names: Tuple[str, ...] = ("loss_sum", "tokens")
    """Summed metrics every loss_func returns (per-dataset token counts come on top)."""
    sequences_per_sample: int = 1
    """Sequences one sample puts through the model (2 for a chosen/rejected pair); the
    pipeline's activation shapes and the tokens/s figures scale with it."""
    log_keys: Tuple[str, ...] = ()
    """Finalized metrics appended to the printed log line (all of them go to metrics.jsonl)."""

    def __init__(self, cfg: Optional[Config] = None):
        self.cfg = cfg

    def wrap_model(self, chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        """This rank's freshly built ``GPTModel`` chunks -> the modules the run trains, wraps
        in DDP and checkpoints (called before DDP, the optimizer and any checkpoint load).
        Identity by default; distillation puts each chunk together with its teacher."""
        return chunks

    def schedule_kwargs(self, model: List[torch.nn.Module], seq_length: int, micro_batch_size: int) -> Dict[str, Any]:
        """Extra keyword arguments for megatron-core's forward-backward function (e.g. the
        pipeline's activation-shape adjustment of distillation). None by default."""
        return {}

    def prepare(self, trainer: "Trainer") -> None:
        """Called once after the model, checkpoint and data are built, before the first step
        (e.g. DPO's reference log-probabilities). No-op by default."""

    def activation_shape(self, seq_length: int, micro_batch_size: int) -> Tuple[int, int]:
        """``(sequence, batch)`` of the activations one micro-batch sends between pipeline
        stages (megatron-core's p2p buffers are allocated with it)."""
        return seq_length, micro_batch_size * self.sequences_per_sample

    def forward_step(self, data_iterator, model) -> Tuple[torch.Tensor, Callable]:
        raise NotImplementedError

    def finalize_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        """Logged metrics from the summed metric tensors of one global batch."""
        raise NotImplementedError

    @staticmethod
    def dataset_token_counts(dataset_id: Optional[torch.Tensor], loss_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``tokens_ds<i>``: loss tokens drawn from each blended dataset (the realised mixture)."""
        counts: Dict[str, torch.Tensor] = {}
        if dataset_id is None:
            return counts
        for ds, n in zip(dataset_id.tolist(), loss_mask.sum(dim=1).tolist()):
            key = f"tokens_ds{int(ds)}"
            counts[key] = counts.get(key, torch.zeros((), dtype=torch.float64)) + n
        return counts
