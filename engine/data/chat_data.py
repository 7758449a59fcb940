"""On-disk layout of SFT and preference data: two megatron-core indexed datasets per prefix.

``PREFIX.bin/.idx``           token ids (megatron-core ``IndexedDataset``, the tokenizer's dtype)
``PREFIX_lossmask.bin/.idx``  one uint8 per token, same sequence lengths and documents
``PREFIX.json``               sidecar: ``kind`` (``sft`` / ``preference``), chat template,
                              sequence length it was cut for, counts, skipped records

SFT: one document per conversation holding one sequence (the whole conversation, EOS
included); mask 1 marks the tokens trained on (assistant content, its end-of-turn marker
and EOS), 0 the rest.

Preference: one document per pair holding two sequences, chosen then rejected (each the
templated prompt followed by that response); mask 2 marks the response tokens (the ones
whose log-probability is scored), 1 the prompt and template tokens (added to ORPO's NLL
term with ``objective.orpo.nll_includes_prompt``), 0 none.

Tokens and masks being ordinary indexed datasets, ``data inspect`` and megatron-core's
readers work on both files; a training sample is addressed by document index.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from engine.data.gpt_data import _split_fractions
from engine.data.indexed_writer import IndexedWriter, read_sidecar

MASK_SUFFIX = "_lossmask"
CHAT_KINDS = ("sft", "preference")
PROMPT, RESPONSE = 1, 2


def mask_prefix(prefix: str) -> str:
    """Prefix of the loss-mask dataset that belongs to ``prefix``."""
    return prefix + MASK_SUFFIX


class ChatWriter:
    """Writes documents of (tokens, mask) sequences to the two datasets, atomically."""

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.tokens = IndexedWriter(prefix, dtype)
        self.masks = IndexedWriter(mask_prefix(prefix), np.uint8)
        self.documents = 0
        self.sequences = 0

    def add_document(self, sequences: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> None:
        """One document made of ``[(token ids, mask values), ...]`` sequences."""
        toks = [np.asarray(t, dtype=self.tokens.dtype) for t, _ in sequences]
        masks = [np.asarray(m, dtype=np.uint8) for _, m in sequences]
        lengths = [len(t) for t in toks]
        assert lengths == [len(m) for m in masks], "mask and tokens differ in length"
        for w, arrays in ((self.tokens, toks), (self.masks, masks)):
            w._builder.add_document(np.concatenate(arrays), lengths)
            w.documents += 1
            w.tokens += sum(lengths)
            for a in arrays:
                w.note_max(a)
        self.documents += 1
        self.sequences += len(sequences)

    def commit(self, sidecar: dict) -> None:
        """Finalize both datasets; the token dataset's sidecar is written last (with the largest
        token id, which `train` checks against the model's vocabulary)."""
        sidecar = {**sidecar, "max_token_id": self.tokens.max_token_id}
        self.masks.commit({**sidecar, "role": "loss mask of " + Path(self.prefix).name})
        self.tokens.commit(sidecar)

    def abort(self) -> None:
        self.tokens.abort()
        self.masks.abort()


class ChatIndexed:
    """Read side: documents of (tokens, mask) sequences of one prefix."""

    def __init__(self, prefix: str, kind: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = prefix
        meta = read_sidecar(prefix)
        if meta is None or meta.get("kind") != kind:
            got = None if meta is None else meta.get("kind")
            raise ValueError(
                f"{prefix} is not {kind} data (sidecar kind {got!r}); "
                f"write it with `python -m engine preprocess --kind {kind}`"
            )
        if not Path(mask_prefix(prefix) + ".idx").exists():
            raise ValueError(f"{prefix}: loss mask {mask_prefix(prefix)}.bin/.idx is missing")
        self.meta = meta
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(mask_prefix(prefix))
        self.doc_index = self.tokens.document_indices
        self.num_docs = len(self.doc_index) - 1
        self.seq_lengths = self.tokens.sequence_lengths

    def document(self, doc: int) -> List[Tuple[np.ndarray, np.ndarray]]:
        """The (tokens int64, mask uint8) sequences of document ``doc``."""
        lo, hi = int(self.doc_index[doc]), int(self.doc_index[doc + 1])
        # Copies: views into the memory maps would dangle once this object is collected.
        return [(self.tokens[i].astype(np.int64), np.array(self.masks[i])) for i in range(lo, hi)]

    def doc_mask_counts(self, value: int = 1) -> np.ndarray:
        """Per document, tokens of its first sequence whose mask is >= ``value``, excluding the
        first token (it is never a label)."""
        out = np.empty(self.num_docs, dtype=np.int64)
        for d in range(self.num_docs):
            m = self.masks[int(self.doc_index[d])]
            out[d] = int((m[1:] >= value).sum())
        return out


def split_range(num_docs: int, split: str, which: int) -> Tuple[int, int]:
    """Documents ``[lo, hi)`` of split ``which`` (0 train, 1 valid, 2 test), cut as
    megatron-core cuts its datasets (the rounding of ``gpt_data.check_split_sizes``)."""
    bounds = [0.0]
    for f in _split_fractions(split):
        bounds.append(bounds[-1] + f)
    cut = [int(round(b * num_docs)) for b in bounds]
    cut[-1] = num_docs
    return cut[which], cut[which + 1]
