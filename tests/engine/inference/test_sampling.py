"""Sampling processors against transformers' own logits processors, on the same logits."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError
from engine.inference.sampling import (
    GenerationOptions,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    next_tokens,
    process_logits,
    row_generators,
)

B, V = 4, 64


def _logits_and_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=gen) * 3
    logits[0, 5] = logits[0, 6] = logits[0].max() + 1  # a tie at the top (top-k keeps both)
    tokens = torch.randint(0, V, (B, 12), generator=gen)
    return logits, tokens


def _hf(processors, tokens, logits):
    from transformers import LogitsProcessorList

    return LogitsProcessorList(processors)(tokens, logits.clone())


@pytest.mark.parametrize("penalty", [1.2, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, tokens = _logits_and_tokens()
    ours = apply_repetition_penalty(logits, tokens, penalty)
    assert torch.equal(ours, _hf([RepetitionPenaltyLogitsProcessor(penalty)], tokens, logits))
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_matches_transformers(k):
    from transformers import TopKLogitsWarper

    logits, tokens = _logits_and_tokens()
    assert torch.equal(apply_top_k(logits, k), _hf([TopKLogitsWarper(k)], tokens, logits))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    from transformers import TopPLogitsWarper

    logits, tokens = _logits_and_tokens()
    assert torch.equal(apply_top_p(logits, p), _hf([TopPLogitsWarper(p)], tokens, logits))


def test_top_p_boundary_is_inclusive_as_in_transformers():
    """Probabilities 1/2, 1/4, 1/8, 1/8 and top_p 0.75: the two 1/8 tokens sum to exactly
    1 - top_p and are both dropped (``cumulative <= 1 - top_p``), as transformers does."""
    from transformers import TopPLogitsWarper

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    ours = apply_top_p(logits, 0.75)
    assert torch.equal(ours, _hf([TopPLogitsWarper(0.75)], torch.zeros(1, 0, dtype=torch.long), logits))
    assert torch.isinf(ours).tolist() == [[False, False, True, True]]


def test_all_processors_in_transformers_order():
    """The model cards' settings: penalty, then temperature, top-k, top-p (generate's order)."""
    from transformers import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits, tokens = _logits_and_tokens()
    opts = GenerationOptions(greedy=False, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)
    hf = _hf(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(20),
            TopPLogitsWarper(0.9),
        ],
        tokens,
        logits,
    )
    ours = process_logits(logits, tokens, opts)
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))


def test_greedy_applies_only_the_penalty():
    logits, tokens = _logits_and_tokens()
    opts = GenerationOptions(greedy=True, temperature=0.5, top_k=2, repetition_penalty=1.3)
    assert torch.equal(process_logits(logits, tokens, opts), apply_repetition_penalty(logits, tokens, 1.3))
    assert torch.equal(next_tokens(logits, tokens, opts, []), apply_repetition_penalty(logits, tokens, 1.3).argmax(-1))


def test_sampling_is_seeded_per_row_and_stays_in_the_nucleus():
    logits, tokens = _logits_and_tokens()
    opts = GenerationOptions(greedy=False, top_k=8)
    draws = [next_tokens(logits, tokens, opts, row_generators(7, 0, B)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    # Row i draws from generator seed + i: row 1 of a batch is row 0 of a batch starting at 1.
    alone = next_tokens(logits[1:2], tokens[1:2], opts, row_generators(7, 1, 1))
    assert alone.item() == draws[0][1].item()
    many = torch.stack([next_tokens(logits, tokens, opts, row_generators(s, 0, B)) for s in range(50)])
    allowed = torch.topk(logits, 8).indices
    assert all(bool((many[:, r, None] == allowed[r]).any(-1).all()) for r in range(B))
    assert len(set(many[:, 2].tolist())) > 1  # it does sample


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}, {"stop_ids": [-3]}],
)
def test_bad_options_are_one_line_config_errors(kwargs):
    with pytest.raises(ConfigError) as err:
        GenerationOptions(**kwargs).check()
    assert "\n" not in str(err.value) and next(iter(kwargs)) in str(err.value)
