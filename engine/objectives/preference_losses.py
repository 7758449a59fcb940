"""The arithmetic of preference objectives, on per-pair sequence log-probabilities.

Pure functions of tensors (no model, no data) so the tests can check every number against
an independent float64 implementation of the published formulas. All of it runs in
float64: a pair's numbers are a handful of scalars, and ORPO's ``log(1 - p)`` loses
everything in low precision when the average log-probability is near 0.

Metric definitions follow TRL (``ORPOTrainer``/``DPOTrainer``): rewards are
``lambda x mean log-prob`` (ORPO) or ``beta x (policy - reference)`` log-prob (DPO);
``accuracies`` is the fraction of pairs whose chosen reward exceeds the rejected one;
``margins`` is chosen minus rejected reward.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def masked_logp_sums(per_token_loss: torch.Tensor, mask: torch.Tensor):
    """(sum of log-probs, token count) per row: the model's per-token loss is -log p."""
    logp = -per_token_loss.to(torch.float64) * mask.to(torch.float64)
    return logp.sum(dim=-1), mask.to(torch.float64).sum(dim=-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler 2012): ``log(-expm1(x))``
    near 0, ``log1p(-exp(x))`` below ``-ln 2``."""
    return torch.where(x > -LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_terms(
    chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, nll: torch.Tensor, lam: float
) -> Dict[str, torch.Tensor]:
    """Per-pair ORPO terms from mean response log-probs and the chosen NLL.

    log odds(y) = log p - log(1 - p) with p the mean-log-prob probability;
    loss = nll - lambda * log sigmoid(log odds(chosen) - log odds(rejected))."""
    c, r = chosen_avg.to(torch.float64), rejected_avg.to(torch.float64)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = F.logsigmoid(log_odds)
    return {
        "loss": nll.to(torch.float64) - lam * ratio,
        "nll": nll.to(torch.float64),
        "log_odds_ratio": ratio,
        "log_odds_chosen": log_odds,
        "chosen_reward": lam * c,
        "rejected_reward": lam * r,
    }


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """Per-pair DPO losses and rewards from sequence log-probs of policy and reference.

    ``sigmoid``: -(1-eps) log s(beta h) - eps log s(-beta h) with h the log-ratio difference;
    ``ipo``: (h - 1/(2 beta))^2 (pass length-averaged log-probs, as TRL does);
    ``hinge``: max(0, 1 - beta h)."""
    pc, pr = policy_chosen.to(torch.float64), policy_rejected.to(torch.float64)
    rc, rr = ref_chosen.to(torch.float64), ref_rejected.to(torch.float64)
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return {"loss": loss, "chosen_reward": beta * (pc - rc), "rejected_reward": beta * (pr - rr)}


def reward_metric_sums(terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Summed reward metrics of a micro-batch (divided by pairs in ``finalize_metrics``)."""
    cr, rr = terms["chosen_reward"].detach(), terms["rejected_reward"].detach()
    return {
        "chosen_reward_sum": cr.sum(),
        "rejected_reward_sum": rr.sum(),
        "correct": (cr > rr).to(torch.float64).sum(),
        "margin_sum": (cr - rr).sum(),
    }


def finalize_reward_metrics(sums: Dict[str, float]) -> Dict[str, float]:
    """TRL's reward metrics from summed values."""
    n = max(sums.get("pairs", 0.0), 1.0)
    return {
        "rewards/chosen": sums.get("chosen_reward_sum", 0.0) / n,
        "rewards/rejected": sums.get("rejected_reward_sum", 0.0) / n,
        "rewards/accuracies": sums.get("correct", 0.0) / n,
        "rewards/margins": sums.get("margin_sum", 0.0) / n,
    }
