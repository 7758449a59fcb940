"""What a model's generations look like: n-gram repetition, EOS termination, length.

Definitions (on the *generated* tokens only: the prompt is excluded, and so is a final
EOS / end-of-turn token, which terminates rather than contributes):

- **n-gram repetition rate** of one generation of ``L`` tokens: of its ``L - n + 1`` n-grams
  (token n-grams at every position), the share that equal an n-gram starting *earlier* in
  the same generation. ``a b c a b c`` has bigrams ab, bc, ca, ab, bc: the last two repeat,
  rate 2/5. Undefined (``None``) when ``L < n``. The report's figure for n is the mean over
  the generations where it is defined (the seed card's "greedy 3-gram repetition" is n = 3
  of greedy generations).
- **EOS termination rate**: the share of generations that stopped by themselves (EOS or the
  chat template's end-of-turn token) before ``max_new_tokens``.
- **mean length**: mean number of generated tokens (stop token excluded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence

NGRAM_ORDERS = (1, 2, 3, 4)
STOPPED = ("eos", "end_of_turn")
"""``finished_by`` values of a generation that ended by itself (engine.inference)."""


def repeated_ngram_rate(tokens: Sequence[Hashable], n: int) -> Optional[float]:
    """Share of the n-grams of ``tokens`` that repeat an earlier n-gram of ``tokens``."""
    if n < 1:
        raise ValueError(f"n-gram order {n} must be >= 1")
    total = len(tokens) - n + 1
    if total <= 0:
        return None
    seen = set()
    repeats = 0
    for i in range(total):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


@dataclass
class Generation:
    """One generation as the metrics see it."""

    tokens: List[int]
    """Generated token ids (without the prompt; a final stop token is removed by
    :func:`generated_tokens`)."""
    finished_by: str
    """``eos``, ``end_of_turn``, ``stop`` (another stop id) or ``length`` (engine.inference)."""
    text: str = ""
    """Decoded text (reported, not scored)."""


def generated_tokens(tokens: Sequence[int], finished_by: str, stop_ids: Sequence[Optional[int]]) -> List[int]:
    """``tokens`` without the stop token that ended them (when they ended by one)."""
    out = list(tokens)
    if finished_by != "length" and out and out[-1] in stop_ids:
        out.pop()
    return out


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def generation_stats(generations: Sequence[Generation]) -> Dict[str, object]:
    """Repetition rates (n = 1..4), EOS termination rate and mean length of ``generations``."""
    if not generations:
        raise ValueError("no generations to measure")
    out: Dict[str, object] = {"generations": len(generations)}
    for n in NGRAM_ORDERS:
        rates = [r for r in (repeated_ngram_rate(g.tokens, n) for g in generations) if r is not None]
        out[f"repetition_{n}gram"] = _mean(rates)
    out["eos_rate"] = sum(g.finished_by in STOPPED for g in generations) / len(generations)
    out["mean_length"] = sum(len(g.tokens) for g in generations) / len(generations)
    return out
