"""DPO (Rafailov et al. 2023) with sigmoid (label smoothing), IPO and hinge losses.

The reference model's log-probabilities are computed once, before training, by a
forward-only pass of the reference weights through this very objective (same model code,
same masks, same reductions) and stored in a cache keyed on the data's and the reference
weights' content (:mod:`engine.objectives.reference`), so no second model sits in memory
while training and changed inputs are never answered with stale values. With the policy initialised from the
reference, the first step's sigmoid loss is ln 2 (up to the last bit of the log-prob sums).
IPO uses length-averaged log-probabilities (as TRL does), sigmoid and hinge summed ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch

from engine.config import Config, DpoConfig
from engine.objectives.preference import PreferenceObjective
from engine.objectives.preference_losses import dpo_terms, finalize_reward_metrics, reward_metric_sums
from engine.objectives.reference import load_or_compute_reference

if TYPE_CHECKING:  # the trainer imports the objectives; only the annotation names it
    from engine.trainer import Trainer

# One micro-batch of the reference pass: (pair indices, their [n, 2] chosen/rejected log-prob sums).
PairLogps = Tuple[np.ndarray, np.ndarray]


class DPOObjective(PreferenceObjective):
    """Direct preference optimisation against stored reference log-probabilities."""

    name = "dpo"
    metric_names = (
        "loss_sum",
        "pairs",
        "chosen_reward_sum",
        "rejected_reward_sum",
        "correct",
        "margin_sum",
        "logp_chosen_sum",
        "logp_rejected_sum",
    )
    log_keys = ("rewards/accuracies", "rewards/margins")

    def __init__(self, cfg: Optional[Config] = None):
        super().__init__(cfg)
        o = cfg.objective.dpo if cfg is not None else DpoConfig()  # the defaults live in the config
        self.beta = o.beta
        self.loss_type = o.loss
        self.label_smoothing = o.label_smoothing
        self.reference: Optional[np.ndarray] = None
        """[pairs, 2] reference log-prob sums (chosen, rejected) by pair index."""
        self._collected: Optional[List[PairLogps]] = None

    # -- the reference pass ----------------------------------------------------------------
    def prepare(self, trainer: "Trainer") -> None:
        """Load (or compute and store) the reference log-probabilities of the dataset."""
        self.reference = load_or_compute_reference(trainer, self)

    def start_collecting(self) -> None:
        """Loss functions record (pair index, chosen, rejected log-prob sums) instead of a loss."""
        self._collected = []

    def stop_collecting(self) -> Optional[List[PairLogps]]:
        """What was collected since ``start_collecting`` (None when it was not called)."""
        out, self._collected = self._collected, None
        return out

    # -- the loss --------------------------------------------------------------------------
    def pair_loss(self, batch, per_token, logp_sum, count):
        if self._collected is not None:
            self._collected.append((batch["pair_index"].cpu().numpy().copy(), logp_sum.detach().cpu().numpy()))
            return torch.zeros(logp_sum.shape[0], dtype=torch.float64, device=logp_sum.device), {}
        if self.reference is None:
            raise RuntimeError("DPO reference log-probabilities were not prepared")
        ref = torch.as_tensor(
            self.reference[batch["pair_index"].cpu().numpy()], dtype=torch.float64, device=logp_sum.device
        )
        policy = logp_sum
        if self.loss_type == "ipo":
            policy, ref = logp_sum / count.clamp(min=1.0), ref / count.clamp(min=1.0)
        terms = dpo_terms(
            policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta, self.loss_type, self.label_smoothing
        )
        metrics = reward_metric_sums(terms)
        metrics.update(logp_chosen_sum=logp_sum[:, 0].detach().sum(), logp_rejected_sum=logp_sum[:, 1].detach().sum())
        return terms["loss"], metrics

    def finalize_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        out = {
            "loss": sums.get("loss_sum", float("nan")) / n,
            "pairs": sums.get("pairs", 0.0),
            "logps/chosen": sums.get("logp_chosen_sum", 0.0) / n,
            "logps/rejected": sums.get("logp_rejected_sum", 0.0) / n,
        }
        out.update(finalize_reward_metrics(sums))
        return out
