"""Perplexity of a causal LM on an indexed dataset, over fixed windows.

How it is computed (the same for every checkpoint, so two checkpoints are comparable):

1. **Which tokens.** The dataset's held-out split, cut as training cut it from the same
   ``data.split`` string: for pretraining data (``.bin/.idx`` of documents, megatron-core's
   ``GPTDataset``) the range of *sequences* ``[round(lo*n), round(hi*n))`` of the validation
   (``valid``) or ``test`` split; ``all`` takes every sequence (for data the checkpoint never
   trained on). Chat data (sidecar ``kind`` ``sft`` / ``preference``) is cut by documents as
   the SFT and preference datasets cut it.
2. **Windows.** Pretraining data: the split's sequences are concatenated in order (each ends
   with its EOS, as the training stream does) and cut into consecutive windows of
   ``seq_length + 1`` tokens with stride ``seq_length``: window ``k`` is
   ``stream[k*L : k*L + L + 1]``, so every token but the first is predicted exactly once,
   from at most ``L`` tokens of context within its window (the context restarts at each
   window; the last window may be shorter). Chat data: each conversation (the chosen one of
   a preference pair) is windowed the same way on its own, and only the tokens the loss
   trains on are scored (SFT: assistant tokens, mask >= 1; preference: the chosen
   response, mask 2).
3. **Score.** ``NLL = -log softmax(logits[:vocab_size])[target]`` in fp32 (the padding
   columns of megatron's padded vocabulary are excluded, as in the exported Hugging Face
   model); the result is the token-weighted mean over all scored tokens of the dataset
   (``sum NLL / tokens``, not a mean of window means) and ``perplexity = exp(mean NLL)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Literal, Optional, Tuple

import numpy as np
import torch

from engine.config import ConfigError

Split = Literal["valid", "test", "all"]
SPLITS: Tuple[str, ...] = ("valid", "test", "all")
_SPLIT_INDEX = {"valid": 1, "test": 2}
# The mask value a chat dataset's scored tokens carry at least (engine.data.chat_data).
_CHAT_SCORED = {"sft": 1, "preference": 2}


@dataclass
class Window:
    """Tokens of one window and the weight (0/1) of each of its ``len(tokens) - 1`` targets."""

    tokens: np.ndarray
    weights: np.ndarray


@dataclass
class PerplexityResult:
    """Perplexity of one dataset."""

    dataset: str
    """The dataset prefix."""
    kind: str
    """``pretrain``, ``sft`` or ``preference`` (the dataset's sidecar)."""
    split: str
    """``valid``, ``test`` or ``all``: which part of the dataset was scored."""
    split_spec: str
    """The ``data.split`` string the held-out part was cut with."""
    seq_length: int
    """Window length (tokens of context at most)."""
    windows: int
    """Number of windows scored."""
    tokens: int
    """Number of scored (predicted) tokens."""
    nll_sum: float
    """Sum of the token NLLs (nats)."""

    @property
    def mean_nll(self) -> float:
        """Token-weighted mean NLL (nats per token)."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        """``exp(mean_nll)``."""
        return math.exp(min(self.mean_nll, 700.0))

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready record (with the derived mean NLL and perplexity)."""
        return {
            "dataset": self.dataset,
            "name": Path(self.dataset).name,
            "kind": self.kind,
            "split": self.split,
            "split_spec": self.split_spec,
            "seq_length": self.seq_length,
            "windows": self.windows,
            "tokens": self.tokens,
            "nll_sum": self.nll_sum,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
        }


def dataset_kind(prefix: str) -> str:
    """``pretrain``, ``sft`` or ``preference`` from the dataset's sidecar (``pretrain``
    when it has none: a megatron-core dataset written by another tool)."""
    from engine.data.indexed_writer import read_sidecar

    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise ConfigError(f"dataset '{prefix}': {prefix + ext} does not exist")
    meta = read_sidecar(prefix) or {}
    return str(meta.get("kind") or "pretrain")


def _range(n: int, split_spec: str, split: str) -> Tuple[int, int]:
    """Items ``[lo, hi)`` of ``split`` among ``n``, cut as megatron-core cuts them."""
    if split == "all":
        return 0, n
    from engine.data.chat_data import split_range

    return split_range(n, split_spec, _SPLIT_INDEX[split])


def _cut(tokens: np.ndarray, weights: np.ndarray, seq_length: int) -> Iterator[Window]:
    """Windows of ``seq_length + 1`` tokens, stride ``seq_length``; none without a scored target."""
    for start in range(0, len(tokens) - 1, seq_length):
        w = weights[start : start + seq_length]
        if w.any():
            yield Window(tokens[start : start + seq_length + 1], w)


def dataset_windows(
    prefix: str, split_spec: str, split: str, seq_length: int, max_tokens: Optional[int] = None
) -> Tuple[str, List[Window]]:
    """(kind, windows) of ``prefix``'s ``split`` (see the module docstring). ``max_tokens``:
    stop once that many targets are scored (the first windows of the split)."""
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' must be one of {', '.join(SPLITS)}")
    if seq_length < 1:
        raise ConfigError(f"seq_length {seq_length} must be positive")
    kind = dataset_kind(prefix)
    windows: List[Window] = []
    if kind == "pretrain":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(prefix)
        lo, hi = _range(len(ds.sequence_lengths), split_spec, split)
        # Only the sequences needed for max_tokens are read: a held-out split can be large.
        parts, total = [], 0
        for i in range(lo, hi):
            parts.append(np.asarray(ds[i], dtype=np.int64))
            total += len(parts[-1])
            if max_tokens is not None and total > max_tokens:
                break
        stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if max_tokens is not None:
            stream = stream[: max_tokens + 1]
        windows = list(_cut(stream, np.ones(max(len(stream) - 1, 0), np.float64), seq_length))
    elif kind in _CHAT_SCORED:
        from engine.data.chat_data import ChatIndexed

        chat = ChatIndexed(prefix, kind)
        lo, hi = _range(chat.num_docs, split_spec, split)
        scored = 0
        for d in range(lo, hi):
            tokens, mask = chat.document(d)[0]  # preference: the chosen sequence
            weights = (mask[1:] >= _CHAT_SCORED[kind]).astype(np.float64)
            for w in _cut(tokens, weights, seq_length):
                windows.append(w)
                scored += int(w.weights.sum())
            if max_tokens is not None and scored >= max_tokens:
                break
    else:
        raise ConfigError(
            f"dataset '{prefix}' has kind '{kind}' (sidecar); perplexity reads pretrain, sft or preference"
        )
    if not windows:
        raise ConfigError(
            f"the {split} split of '{prefix}' (data.split={split_spec!r}) holds no token to score; "
            f"pass --split all or another dataset"
        )
    return kind, windows


LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""``tokens [b, s] (int64) -> logits [b, s, V >= vocab_size]`` of a causal LM."""


def gpt_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Logits of a whole (single-chunk) megatron ``GPTModel``: causal mask, positions 0..s-1."""
    device = next(model.parameters()).device

    def logits(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        return model(tokens, positions, None)

    return logits


def score_windows(
    logits_fn: LogitsFn, windows: List[Window], vocab_size: int, batch_size: int = 8, desc: str = "perplexity"
) -> Tuple[float, int]:
    """(sum of NLLs, scored tokens) of ``windows`` under ``logits_fn``. Windows of equal
    length are batched together (``batch_size`` at a time); shows a progress bar."""
    from tqdm import tqdm

    by_length: Dict[int, List[Window]] = {}
    for w in windows:
        by_length.setdefault(len(w.tokens), []).append(w)
    nll_sum, scored = 0.0, 0
    with tqdm(total=len(windows), desc=desc, unit="win", mininterval=1.0) as bar, torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                batch = group[i : i + batch_size]
                tokens = torch.from_numpy(np.stack([w.tokens for w in batch]))
                weights = torch.from_numpy(np.stack([w.weights for w in batch]))
                logits = logits_fn(tokens[:, :-1]).float()[..., :vocab_size].cpu()
                logp = torch.log_softmax(logits, dim=-1)
                nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).double()
                nll_sum += float((nll * weights).sum())
                scored += int(weights.sum())
                bar.update(len(batch))
    return nll_sum, scored


def perplexity(
    logits_fn: LogitsFn,
    prefix: str,
    vocab_size: int,
    split_spec: str,
    split: str,
    seq_length: int,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
) -> PerplexityResult:
    """Perplexity of the model behind ``logits_fn`` on ``prefix``'s ``split``."""
    kind, windows = dataset_windows(prefix, split_spec, split, seq_length, max_tokens)
    nll_sum, tokens = score_windows(logits_fn, windows, vocab_size, batch_size, desc=f"ppl {Path(prefix).name}")
    return PerplexityResult(
        dataset=prefix,
        kind=kind,
        split=split,
        split_spec=split_spec,
        seq_length=seq_length,
        windows=len(windows),
        tokens=tokens,
        nll_sum=nll_sum,
    )
