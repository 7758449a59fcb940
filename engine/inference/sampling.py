"""What decides the next token: the generation options and the logits processors.

The processors follow Hugging Face transformers' definitions (and order: repetition penalty,
then temperature, top-k, top-p), so ``temperature 0.7, top_p 0.9, top_k 50,
repetition_penalty 1.2`` means here what it means on a model card, in ``generate`` and in
Ollama. Sampling draws from a ``torch.Generator`` owned by the call, never from the global
RNG, so a seed reproduces a generation whatever else the process does.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, List, Sequence

import torch

from engine.config import ConfigError, Range, field_range


@dataclass
class GenerationOptions:
    """How to generate: greedy or sampled, how long, when to stop."""

    greedy: bool = True
    """Take the most likely token each step (temperature, top-k and top-p are then unused;
    the repetition penalty still applies, as in transformers)."""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """Sampling: divide the logits by this (< 1 sharpens, > 1 flattens)."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = off)."""
    top_k: Annotated[int, Range(ge=0)] = 0
    """Sampling: keep the ``top_k`` most likely tokens (0 = off)."""
    repetition_penalty: Annotated[float, Range(gt=0)] = 1.0
    """CTRL / transformers penalty on every token already in the sequence (prompt included):
    its logit is divided by this when positive, multiplied when negative (1 = off)."""
    max_new_tokens: Annotated[int, Range(ge=1)] = 128
    """Most tokens generated per prompt."""
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 1234
    """Seed of the sampling generator (same seed, same options, same tokens)."""
    stop_ids: List[int] = field(default_factory=list)
    """Token ids that end a generation besides EOS and the chat template's end of turn."""
    batch_size: Annotated[int, Range(ge=1)] = 8
    """Prompts decoded together (one KV cache of ``batch_size`` rows)."""

    def check(self) -> "GenerationOptions":
        """Raise ConfigError (one line) for a value outside its range; returns self."""
        hints = typing.get_type_hints(GenerationOptions, include_extras=True)
        for f in dataclasses.fields(self):
            rng = field_range(hints[f.name])
            value = getattr(self, f.name)
            if rng is not None and not rng.contains(value):
                raise ConfigError(f"generation option {f.name}={value!r} must be {rng}")
        if any(not isinstance(i, int) or i < 0 for i in self.stop_ids):
            raise ConfigError(f"generation option stop_ids={self.stop_ids!r} must be token ids >= 0")
        return self


def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: ``logits [b, V]``, ``tokens [b, n]``
    (each row's sequence so far; ids >= V are ignored)."""
    if penalty == 1.0 or tokens.numel() == 0:
        return logits
    tokens = tokens.clamp(max=logits.size(-1) - 1)  # ids beyond the vocabulary never occur
    score = torch.gather(logits, 1, tokens)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, tokens, score)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties at the k-th value kept), -inf elsewhere."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability stays
    within ``1 - top_p`` (the most likely token always survives)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, tokens: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """The logits the next token is chosen from (fp32), after every enabled processor."""
    logits = apply_repetition_penalty(logits.float(), tokens, options.repetition_penalty)
    if options.greedy:
        return logits
    logits = logits / options.temperature
    return apply_top_p(apply_top_k(logits, options.top_k), options.top_p)


def row_generators(seed: int, first: int, count: int) -> List[torch.Generator]:
    """One sampling generator per prompt, seeded ``seed + prompt index``: a prompt's sample
    does not depend on which other prompts share its batch."""
    return [torch.Generator().manual_seed(seed + first + i) for i in range(count)]


def next_tokens(
    logits: torch.Tensor, tokens: torch.Tensor, options: GenerationOptions, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token id per row of ``logits [b, V]`` given each row's ``tokens`` so far; row i
    samples from ``generators[i]``."""
    scores = process_logits(logits, tokens, options)
    if options.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], num_samples=1, generator=g) for i, g in enumerate(generators)])
