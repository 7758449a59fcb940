"""Supervised fine-tuning: next-token loss on the tokens the loss mask selects.

The arithmetic is the pretraining objective's (masked per-token loss summed, normalised
by the loss tokens of the global batch); what differs is the data (``data_kind = "sft"``:
conversations with assistant-only masks, packing, replay) and that packed sequences carry
a block-diagonal ``attention_mask`` into the model.
"""
from __future__ import annotations

from functools import partial

from engine.objectives.pretrain import PretrainObjective


class SFTObjective(PretrainObjective):
    """Masked causal LM loss over SFT (and replayed pretraining) samples."""

    name = "sft"
    data_kind = "sft"

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        # Packed sequences: attention stays within each conversation (True = masked out).
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return output, partial(self.loss_func, batch["loss_mask"].float(), batch.get("dataset_id"))
