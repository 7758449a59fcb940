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


def test_generation_metrics_of_greedy_answers_match_transformers(two_checkpoints, tmp_path):
    """`eval --prompts`: each prompt a user turn of the chat template, greedy; the metrics equal
    those of transformers' own greedy `generate` on the converted model."""
    from engine.data.chat_template import get_chat_template
    from engine.data.tokenizer import load_tokenizer
    from engine.evaluation.generation_metrics import Generation, generation_stats
    from engine.model_io import checkpoint_config

    _, _, ckpt = two_checkpoints  # the perturbed weights: varied answers, not 3 steps' newlines
    prompts = ["대한민국은", "국회의원의 임기는", "모든 국민은"]
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts), encoding="utf-8")
    result = evaluate_checkpoint(
        ckpt, EvalOptions(prompts=str(tmp_path / "prompts.jsonl"), max_new_tokens=12, max_tokens=64)
    )

    cfg = checkpoint_config(ckpt)
    tok = load_tokenizer(cfg.data.tokenizer)
    template = get_chat_template(cfg.data.chat_template)
    stops = [tok.eod, tok.token_to_id("<|im_end|>")]
    hf = _hf_float64(ckpt)
    expected = []
    for p in prompts:
        ids = [i for piece, _, _ in template.encode(tok, [{"role": "user", "content": p}], True) for i in piece]
        out = hf.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=tok.eod
        )
        new = out[0, len(ids) :].tolist()
        stopped = bool(new) and new[-1] in stops
        expected.append(Generation(new[:-1] if stopped else new, "eos" if stopped else "length"))
    assert len({tuple(g.tokens) for g in expected}) > 1  # the prompts matter
    assert result["generation"] == pytest.approx(generation_stats(expected))
    assert [s["prompt"] for s in result["samples"]] == prompts
