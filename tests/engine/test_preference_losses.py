"""ORPO and DPO arithmetic against an independent float64 implementation of the formulas.

The reference functions below are written from the papers / TRL's definitions with plain
``math`` on Python floats, one pair at a time, so they share no code with the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.objectives.dpo import DPOObjective
from engine.objectives.orpo import ORPOObjective
from engine.objectives.preference_losses import dpo_terms, log1mexp, orpo_terms
from engine.run_config import load_run_config

TOL = 1e-6


def ref_log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_orpo(c: float, r: float, nll: float, lam: float):
    """ORPO per pair: log odds = log(p/(1-p)) with p = exp(mean log-prob)."""
    log_odds = (c - math.log(-math.expm1(c))) - (r - math.log(-math.expm1(r)))
    ratio = ref_log_sigmoid(log_odds)
    return {
        "loss": nll - lam * ratio,
        "log_odds_ratio": ratio,
        "log_odds_chosen": log_odds,
        "chosen_reward": lam * c,
        "rejected_reward": lam * r,
    }


def ref_dpo(pc, pr, rc, rr, beta, kind, eps=0.0):
    h = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        loss = -(1 - eps) * ref_log_sigmoid(beta * h) - eps * ref_log_sigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = max(0.0, 1 - beta * h)
    return {"loss": loss, "chosen_reward": beta * (pc - rc), "rejected_reward": beta * (pr - rr)}


def _avg_logps(rng, n):
    # Mean log-probs from near zero (p ~ 1, where log(1-p) is fragile) to very negative.
    return np.concatenate(
        [-(10 ** rng.uniform(-9, -3, n // 3)), -rng.uniform(0.01, 5, n // 3), -rng.uniform(20, 200, n - 2 * (n // 3))]
    )


def test_log1mexp_stable_at_both_ends():
    x = torch.tensor([-1e-12, -1e-6, -0.5, -math.log(2), -1.0, -50.0, -700.0], dtype=torch.float64)
    for xi, yi in zip(x.tolist(), log1mexp(x).tolist()):
        expect = math.log(-math.expm1(xi))
        assert math.isfinite(yi) and abs(yi - expect) <= 1e-12 * max(1.0, abs(expect))


def test_orpo_terms_match_reference():
    rng = np.random.default_rng(0)
    c, r = _avg_logps(rng, 60), rng.permutation(_avg_logps(rng, 60))
    nll = rng.uniform(0.1, 5, 60)
    got = orpo_terms(torch.tensor(c), torch.tensor(r), torch.tensor(nll), 0.25)
    for i in range(60):
        ref = ref_orpo(c[i], r[i], nll[i], 0.25)
        for k, v in ref.items():
            assert got[k][i].item() == pytest.approx(v, rel=TOL, abs=TOL), (k, c[i], r[i])


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_terms_match_reference(kind, eps):
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (-rng.uniform(0, 300, 50) for _ in range(4))
    got = dpo_terms(*(torch.tensor(a) for a in (pc, pr, rc, rr)), beta=0.1, loss_type=kind, label_smoothing=eps)
    for i in range(50):
        ref = ref_dpo(pc[i], pr[i], rc[i], rr[i], 0.1, kind, eps)
        for k, v in ref.items():
            assert got[k][i].item() == pytest.approx(v, rel=TOL, abs=TOL), (kind, k)


def test_dpo_terms_at_reference_are_ln2():
    x = torch.tensor([-3.0, -120.5, -0.001])
    y = torch.tensor([-7.0, -80.25, -40.0])
    for eps in (0.0, 0.2):
        t = dpo_terms(x, y, x, y, beta=0.5, label_smoothing=eps)
        assert torch.all(t["loss"] == math.log(2.0))


def _pair_batch(rng, b=6, s=12):
    """A micro-batch of b pairs with per-token losses (the model's output) and masks."""
    per_token = torch.tensor(rng.uniform(0, 8, (b, 2, s)))
    per_token[0] = torch.tensor(rng.uniform(0, 1e-7, (2, s)))  # p ~ 1: near-zero averages
    loss_mask = torch.zeros(b, 2, s)
    nll_mask = torch.zeros(b, 2, s)
    for i in range(b):
        for j in range(2):
            start, end = int(rng.integers(1, 5)), int(rng.integers(7, s))
            loss_mask[i, j, start:end] = 1
            nll_mask[i, j, :end] = 1
    batch = {
        "tokens": torch.zeros(b, 2, s, dtype=torch.long),
        "loss_mask": loss_mask,
        "nll_mask": nll_mask,
        "pair_index": torch.arange(b),
    }
    return batch, per_token


@pytest.mark.parametrize("include_prompt", [False, True])
def test_orpo_objective_metrics_match_reference(include_prompt):
    rng = np.random.default_rng(2)
    cfg = load_run_config(
        None,
        [
            "objective.name=orpo",
            "objective.orpo.weight=0.3",
            f"objective.orpo.nll_includes_prompt={str(include_prompt).lower()}",
        ],
    )
    obj = ORPOObjective(cfg)
    batch, per_token = _pair_batch(rng)
    b, _, s = per_token.shape
    loss_sum, units, sums = obj.loss_func(batch, per_token.reshape(2 * b, s))
    metrics = obj.finalize_metrics({k: float(v) for k, v in sums.items()})
    refs = []
    for i in range(b):
        lp = [
            -(per_token[i, j] * batch["loss_mask"][i, j]).sum().item() / batch["loss_mask"][i, j].sum().item()
            for j in range(2)
        ]
        m = batch["nll_mask" if include_prompt else "loss_mask"][i, 0]
        nll = (per_token[i, 0] * m).sum().item() / m.sum().item()
        refs.append((ref_orpo(lp[0], lp[1], nll, 0.3), nll))
    assert int(units) == b
    mean = lambda f: sum(f(r) for r in refs) / b  # noqa: E731
    assert float(loss_sum) / b == pytest.approx(mean(lambda r: r[0]["loss"]), rel=TOL)
    assert metrics["nll_loss"] == pytest.approx(mean(lambda r: r[1]), rel=TOL)
    assert metrics["rewards/chosen"] == pytest.approx(mean(lambda r: r[0]["chosen_reward"]), rel=TOL)
    assert metrics["rewards/rejected"] == pytest.approx(mean(lambda r: r[0]["rejected_reward"]), rel=TOL)
    assert metrics["rewards/margins"] == pytest.approx(
        mean(lambda r: r[0]["chosen_reward"] - r[0]["rejected_reward"]), rel=TOL
    )
    assert metrics["rewards/accuracies"] == pytest.approx(
        mean(lambda r: float(r[0]["chosen_reward"] > r[0]["rejected_reward"])), abs=1e-12
    )
    assert metrics["log_odds_ratio"] == pytest.approx(mean(lambda r: r[0]["log_odds_ratio"]), rel=TOL)
    assert metrics["log_odds_chosen"] == pytest.approx(mean(lambda r: r[0]["log_odds_chosen"]), rel=TOL)
    assert math.isfinite(metrics["loss"])


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_dpo_objective_metrics_match_reference(kind):
    rng = np.random.default_rng(3)
    cfg = load_run_config(None, ["objective.name=dpo", "objective.dpo.beta=0.2", f"objective.dpo.loss={kind}"])
    obj = DPOObjective(cfg)
    batch, per_token = _pair_batch(rng)
    b, _, s = per_token.shape
    sums_policy = [[-(per_token[i, j] * batch["loss_mask"][i, j]).sum().item() for j in range(2)] for i in range(b)]
    counts = [[batch["loss_mask"][i, j].sum().item() for j in range(2)] for i in range(b)]
    obj.reference = np.array(sums_policy) + rng.uniform(-3, 3, (b, 2))
    loss_sum, _, sums = obj.loss_func(batch, per_token.reshape(2 * b, s))
    metrics = obj.finalize_metrics({k: float(v) for k, v in sums.items()})
    refs = []
    for i in range(b):
        p, r = list(sums_policy[i]), list(obj.reference[i])
        if kind == "ipo":
            p = [p[j] / counts[i][j] for j in range(2)]
            r = [r[j] / counts[i][j] for j in range(2)]
        refs.append(ref_dpo(p[0], p[1], r[0], r[1], 0.2, kind))
    mean = lambda f: sum(f(r) for r in refs) / b  # noqa: E731
    assert float(loss_sum) / b == pytest.approx(mean(lambda r: r["loss"]), rel=TOL)
    assert metrics["rewards/margins"] == pytest.approx(
        mean(lambda r: r["chosen_reward"] - r["rejected_reward"]), rel=TOL, abs=TOL
    )
    assert metrics["rewards/accuracies"] == mean(lambda r: float(r["chosen_reward"] > r["rejected_reward"]))

    # Swapping chosen and rejected flips the sign of the margin.
    swapped = {**batch, "loss_mask": batch["loss_mask"].flip(1), "nll_mask": batch["nll_mask"].flip(1)}
    obj.reference = obj.reference[:, ::-1].copy()
    _, _, sums2 = obj.loss_func(swapped, per_token.flip(1).reshape(2 * b, s))
    m2 = obj.finalize_metrics({k: float(v) for k, v in sums2.items()})
    assert m2["rewards/margins"] == pytest.approx(-metrics["rewards/margins"], rel=1e-12)


def test_orpo_swap_flips_margin_and_log_odds():
    rng = np.random.default_rng(4)
    c, r = torch.tensor(_avg_logps(rng, 30)), torch.tensor(_avg_logps(rng, 30))
    a = orpo_terms(c, r, torch.zeros(30), 0.25)
    b = orpo_terms(r, c, torch.zeros(30), 0.25)
    assert torch.allclose(a["log_odds_chosen"], -b["log_odds_chosen"], rtol=1e-12, atol=0)
    assert torch.allclose(a["chosen_reward"] - a["rejected_reward"], -(b["chosen_reward"] - b["rejected_reward"]))


def test_dpo_policy_equals_reference_objective_is_ln2():
    rng = np.random.default_rng(5)
    obj = DPOObjective(load_run_config(None, ["objective.name=dpo"]))
    batch, per_token = _pair_batch(rng)
    b, _, s = per_token.shape
    obj.reference = np.array(
        [[-(per_token[i, j] * batch["loss_mask"][i, j]).sum().item() for j in range(2)] for i in range(b)]
    )
    loss_sum, _, _ = obj.loss_func(batch, per_token.reshape(2 * b, s))
    assert float(loss_sum) / b == pytest.approx(math.log(2.0), rel=1e-7)
