"""ORPO (Hong et al. 2024): supervised NLL on the chosen response plus an odds-ratio penalty.

loss per pair = NLL(chosen) - lambda * log sigmoid(log odds(chosen) - log odds(rejected)),
with odds from the response log-probabilities averaged over response tokens and
``log(1 - p)`` from a stable ``log1mexp`` in float64. The NLL is the mean over the chosen
response tokens of the pair (``objective.orpo.nll_includes_prompt`` adds the prompt tokens, as
TRL does; both under ``objective.orpo``); per-pair terms are averaged over the pairs of the global batch.
"""

from __future__ import annotations

from typing import Dict, Optional

from engine.config import Config, OrpoConfig
from engine.objectives.preference import PreferenceObjective
from engine.objectives.preference_losses import (
    finalize_reward_metrics,
    masked_logp_sums,
    orpo_terms,
    reward_metric_sums,
)


class ORPOObjective(PreferenceObjective):
    """Odds-ratio preference optimisation; no reference model."""

    name = "orpo"
    metric_names = (
        "loss_sum",
        "pairs",
        "nll_sum",
        "log_odds_ratio_sum",
        "log_odds_chosen_sum",
        "chosen_reward_sum",
        "rejected_reward_sum",
        "correct",
        "margin_sum",
    )
    log_keys = ("nll_loss", "rewards/accuracies", "rewards/margins")

    def __init__(self, cfg: Optional[Config] = None):
        super().__init__(cfg)
        o = cfg.objective.orpo if cfg is not None else OrpoConfig()  # the defaults live in the config
        self.lam = o.weight
        self.include_prompt = o.nll_includes_prompt

    def pair_loss(self, batch, per_token, logp_sum, count):
        avg = logp_sum / count.clamp(min=1.0)
        nll_mask = batch["nll_mask"] if self.include_prompt else batch["loss_mask"]
        chosen_sum, chosen_count = masked_logp_sums(per_token[:, 0], nll_mask[:, 0])
        terms = orpo_terms(avg[:, 0], avg[:, 1], -chosen_sum / chosen_count.clamp(min=1.0), self.lam)
        metrics = reward_metric_sums(terms)
        metrics.update(
            nll_sum=terms["nll"].detach().sum(),
            log_odds_ratio_sum=terms["log_odds_ratio"].detach().sum(),
            log_odds_chosen_sum=terms["log_odds_chosen"].detach().sum(),
        )
        return terms["loss"], metrics

    def finalize_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        n = max(sums.get("pairs", 0.0), 1.0)
        out = {
            "loss": sums.get("loss_sum", float("nan")) / n,
            "pairs": sums.get("pairs", 0.0),
            "nll_loss": sums.get("nll_sum", 0.0) / n,
            "log_odds_ratio": sums.get("log_odds_ratio_sum", 0.0) / n,
            "log_odds_chosen": sums.get("log_odds_chosen_sum", 0.0) / n,
        }
        out.update(finalize_reward_metrics(sums))
        return out
