"""Repetition, EOS rate and length on hand-made generations with hand-computed values."""

from __future__ import annotations

import pytest

from engine.evaluation.generation_metrics import Generation, generated_tokens, generation_stats, repeated_ngram_rate
from engine.evaluation.report import generation_table


@pytest.mark.parametrize(
    "text, n, expected",
    [
        # a b c a b c: unigrams 6, the last three repeat
        ("a b c a b c", 1, 3 / 6),
        # bigrams ab bc ca ab bc: the last two repeat
        ("a b c a b c", 2, 2 / 5),
        # trigrams abc bca cab abc: the last repeats
        ("a b c a b c", 3, 1 / 4),
        # 4-grams abca bcab cabc: none repeats
        ("a b c a b c", 4, 0.0),
        ("x x x x", 1, 3 / 4),
        ("x x x x", 2, 2 / 3),
        ("x x x x", 3, 1 / 2),
        ("x x x x", 4, 0.0),
        # the cat sat on the mat the cat sat: trigrams 7, "the cat sat" repeats once
        ("the cat sat on the mat the cat sat", 3, 1 / 7),
        # the same words: bigrams 8, "the cat" and "cat sat" repeat
        ("the cat sat on the mat the cat sat", 2, 2 / 8),
        ("one two", 3, None),  # fewer tokens than n: undefined
        ("", 1, None),
    ],
)
def test_repeated_ngram_rate(text, n, expected):
    rate = repeated_ngram_rate(text.split(), n)
    assert rate == (None if expected is None else pytest.approx(expected))


def test_ngram_order_must_be_positive():
    with pytest.raises(ValueError):
        repeated_ngram_rate([1, 2], 0)


def test_generation_stats():
    EOS = 0
    gens = [
        Generation(generated_tokens([5, 6, 5, 6, EOS], "eos", [EOS]), "eos"),  # 5 6 5 6
        Generation(generated_tokens([7, 7, 7, 7, 7, 7], "length", [EOS]), "length"),  # stop id absent
        Generation(generated_tokens([9, 99], "end_of_turn", [EOS, 99]), "end_of_turn"),  # 9
    ]
    assert [g.tokens for g in gens] == [[5, 6, 5, 6], [7] * 6, [9]]
    stats = generation_stats(gens)
    assert stats["generations"] == 3
    assert stats["eos_rate"] == pytest.approx(2 / 3)
    assert stats["mean_length"] == pytest.approx((4 + 6 + 1) / 3)
    # 1-grams: 2/4, 5/6, 0/1 -> mean over the three; 2-grams (56 65 56; 77 x5): 1/3 and 4/5;
    # 3-grams (565 656; 777 x4): 0/2 and 3/4; 4-grams: 0/1 and 2/3 (the third has none)
    assert stats["repetition_1gram"] == pytest.approx((2 / 4 + 5 / 6 + 0) / 3)
    assert stats["repetition_2gram"] == pytest.approx((1 / 3 + 4 / 5) / 2)
    assert stats["repetition_3gram"] == pytest.approx((0 / 2 + 3 / 4) / 2)
    assert stats["repetition_4gram"] == pytest.approx((0 / 1 + 2 / 3) / 2)
    row = generation_table(stats).splitlines()[-1]
    assert row == "| 3 | 44.4% | 56.7% | 37.5% | 33.3% | 66.7% | 3.7 |"
    with pytest.raises(ValueError):
        generation_stats([])
