"""Supervised fine-tuning: next-token loss on the tokens the loss mask selects.

The arithmetic is the pretraining objective's (masked per-token loss summed, normalised
by the loss tokens of the global batch); what differs is the data (``data_kind = "sft"``:
conversations with assistant-only masks, packing, replay) and that packed micro-batches go
through the model in megatron-core's THD layout (``engine/data/packed_seq.py``), so
attention and RoPE positions stay within each conversation.
"""

from __future__ import annotations

from typing import Tuple

from engine.data.packed_seq import thd_micro_batch
from engine.objectives.pretrain import PretrainObjective


class SFTObjective(PretrainObjective):
    """Masked causal LM loss over SFT (and replayed pretraining) samples."""

    name = "sft"
    data_kind = "sft"

    @property
    def packed(self) -> bool:
        """Whether micro-batches are packed conversations (``data.packing``)."""
        return bool(self.cfg is not None and self.cfg.data.packing)

    def activation_shape(self, seq_length: int, micro_batch_size: int) -> Tuple[int, int]:
        # THD: the micro-batch travels as one row of micro_batch_size * seq_length tokens.
        if self.packed:
            return seq_length * micro_batch_size, 1
        return super().activation_shape(seq_length, micro_batch_size)

    def model_inputs(self, batch):
        if self.packed:
            return thd_micro_batch(batch)
        return super().model_inputs(batch)
