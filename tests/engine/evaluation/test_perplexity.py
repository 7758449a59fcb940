"""Perplexity against an independent float64 computation: the checkpoint converted to
transformers' own LlamaForCausalLM (float64), the held-out tokens read and windowed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.config import ConfigError
from engine.evaluation.evaluate import EvalOptions, compare_checkpoints, evaluate_checkpoint


def _hf_float64(ckpt):
    """The checkpoint as transformers' model, float64."""
    from engine.model_io import load_model
    from models.hf_convert import hf_config, hf_model_class, megatron_to_hf

    loaded = load_model(ckpt)
    model = hf_model_class(loaded.cfg.model)(hf_config(loaded.cfg.model)).double().eval()
    state = {k: v.double() for k, v in megatron_to_hf(loaded.model.state_dict(), loaded.cfg.model).items()}
    model.load_state_dict(state, strict=True)
    return model


def _nll64(model, tokens: np.ndarray, weights: np.ndarray) -> float:
    """Sum of weighted token NLLs of one window, float64."""
    ids = torch.from_numpy(tokens[None].astype(np.int64))
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.double()
    logp = torch.log_softmax(logits, -1)[0]
    nll = -logp[torch.arange(len(tokens) - 1), ids[0, 1:]]
    return float((nll * torch.from_numpy(weights)).sum())


def test_perplexity_matches_float64_transformers(two_checkpoints, post_training_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, ckpt, _ = two_checkpoints
    L, budget = 128, 600
    sft = post_training_data["sft"]
    result = evaluate_checkpoint(ckpt, EvalOptions(max_tokens=budget, datasets=[post_training_data["pretrain"], sft]))
    pre, chat = result["perplexity"]
    hf = _hf_float64(ckpt)

    # Pretraining data: the validation split of "80,20,0" is the last 20% of the sequences,
    # concatenated; windows of L+1 tokens at stride L; the first `budget` targets.
    ds = IndexedDataset(post_training_data["pretrain"])
    n = len(ds.sequence_lengths)
    stream = np.concatenate([ds[i] for i in range(round(0.8 * n), n)])[: budget + 1].astype(np.int64)
    nll = sum(_nll64(hf, stream[s : s + L + 1], np.ones(len(stream[s : s + L + 1]) - 1)) for s in range(0, budget, L))
    assert (pre["split"], pre["kind"], pre["tokens"], pre["windows"]) == (
        "valid",
        "pretrain",
        budget,
        math.ceil(budget / L),
    )
    assert pre["mean_nll"] == pytest.approx(nll / budget, abs=1e-5)
    assert pre["perplexity"] == pytest.approx(math.exp(nll / budget), rel=1e-4)

    # SFT data: each conversation on its own, only the assistant tokens (loss mask 1) scored.
    tok, mask = IndexedDataset(sft), IndexedDataset(sft + "_lossmask")
    docs = tok.document_indices
    lo = round(0.8 * (len(docs) - 1))
    total, scored = 0.0, 0
    for d in range(lo, len(docs) - 1):
        t, m = tok[int(docs[d])].astype(np.int64), mask[int(docs[d])]
        w = (m[1:] >= 1).astype(np.float64)
        for s in range(0, len(t) - 1, L):
            total += _nll64(hf, t[s : s + L + 1], w[s : s + L])
            scored += int(w[s : s + L].sum())
        if scored >= budget:
            break
    assert (chat["kind"], chat["tokens"]) == ("sft", scored)
    assert chat["mean_nll"] == pytest.approx(total / scored, abs=1e-5)


def test_compare_reports_the_change(two_checkpoints, post_training_data):
    _, first, second = two_checkpoints
    opts = EvalOptions(max_tokens=256, split="all")
    comparison = compare_checkpoints(str(first), str(second), opts)
    a, b = (evaluate_checkpoint(c, opts)["perplexity"][0]["perplexity"] for c in (first, second))
    (row,) = comparison["change"]
    assert (row["ppl_a"], row["ppl_b"]) == (pytest.approx(a), pytest.approx(b))
    assert row["change"] == pytest.approx((b - a) / a)
    assert a != pytest.approx(b)  # the perturbed weights score differently


def test_bad_eval_input_is_one_line(two_checkpoints, tmp_path):
    _, ckpt, _ = two_checkpoints
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_checkpoint(ckpt, EvalOptions(datasets=[str(tmp_path / "missing")]))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        evaluate_checkpoint(tmp_path / "nothing", EvalOptions())
    with pytest.raises(ConfigError, match="holds out nothing"):
        evaluate_checkpoint(ckpt, EvalOptions(split_spec="100,0,0"))
