"""`data merge`: concatenate indexed datasets (e.g. preprocessing shards) into one.

Uses megatron-core's ``IndexedDatasetBuilder.add_index``; refuses inputs made with
different tokenizers or dtypes, since their token ids would not mean the same thing, and
inputs of different kinds (pretraining, SFT, preference), whose documents differ in shape.
SFT and preference data are merged with their loss masks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Sequence

import numpy

from engine.config import ConfigError
from engine.data.chat_data import CHAT_KINDS, mask_prefix
from engine.data.indexed_writer import SIDECAR_FORMAT_VERSION, IndexedWriter, read_sidecar
from engine.data.preprocess_common import tool_version
from engine.data.verify import read_index, scan_max_token_id


class MergeError(ValueError):
    """The inputs cannot be merged."""


def normalize_prefix(path: str) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin``, ``PREFIX.idx`` or ``PREFIX.json``."""
    for suffix in (".bin", ".idx", ".json"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def _check_chat_inputs(prefixes: Sequence[str], sidecars: Sequence[dict]) -> None:
    """SFT/preference inputs must have their loss masks and share template and cut length."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for p in prefixes:
        if not IndexedDataset.exists(mask_prefix(p)):
            raise MergeError(f"{p}: loss mask {mask_prefix(p)}.bin/.idx is missing")
    for key in ("chat_template_fingerprint", "seq_length"):
        values = {str(s.get(key)) for s in sidecars}
        if len(values) > 1:
            raise MergeError(
                f"inputs differ in {key}: " + ", ".join(f"{p} has {s.get(key)}" for p, s in zip(prefixes, sidecars))
            )


def merge_datasets(inputs: Sequence[str], output_prefix: str) -> dict:
    """Concatenate ``inputs`` (prefixes, in order) into ``output_prefix``; returns its sidecar."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes: List[str] = list(dict.fromkeys(normalize_prefix(p) for p in inputs))
    if not prefixes:
        raise MergeError("no inputs")
    if normalize_prefix(output_prefix) in prefixes:
        raise MergeError("the output prefix is also an input")
    datasets, sidecars = [], []
    for p in prefixes:
        if not IndexedDataset.exists(p):
            raise MergeError(f"{p}: no complete .bin/.idx pair")
        try:
            read_index(p)  # a truncated .bin or a foreign .idx would be copied as is
        except ConfigError as exc:
            raise MergeError(str(exc)) from None
        datasets.append(IndexedDataset(p, mmap=True))
        sidecars.append(read_sidecar(p) or {})
    dtypes = {ds.index.dtype for ds in datasets}
    if len(dtypes) > 1:
        raise MergeError(f"inputs have different token dtypes: {sorted(d.__name__ for d in dtypes)}")
    hashes = {h for h in ((s.get("tokenizer") or {}).get("sha256") for s in sidecars) if h is not None}
    if len(hashes) > 1:
        raise MergeError(f"inputs were made with different tokenizers: {sorted(hashes)}")
    # Data without a sidecar (megatron-core's own tools) is pretraining data.
    kinds = [s.get("kind", "pretrain") for s in sidecars]
    if len(set(kinds)) > 1:
        raise MergeError(
            "inputs are different kinds of data: " + ", ".join(f"{p} is {k}" for p, k in zip(prefixes, kinds))
        )
    kind = kinds[0]
    if kind in CHAT_KINDS:
        _check_chat_inputs(prefixes, sidecars)
    # Older sidecars have no max_token_id: scan those inputs once now.
    maxima: List[int] = [
        m if m is not None else scan_max_token_id(p, ds.index.dtype)
        for p, m, ds in zip(prefixes, (s.get("max_token_id") for s in sidecars), datasets)
    ]

    documents = sum(len(ds.document_indices) - 1 for ds in datasets)
    tokens = sum(int(ds.sequence_lengths.sum()) for ds in datasets)
    dtype = datasets[0].index.dtype
    del datasets  # release the memory maps before copying
    writer = IndexedWriter(output_prefix, dtype)
    masks = IndexedWriter(mask_prefix(output_prefix), numpy.uint8) if kind in CHAT_KINDS else None
    try:
        for p in prefixes:
            writer.add_dataset(p)
            if masks is not None:
                masks.add_dataset(mask_prefix(p))
        first = next((s for s in sidecars if s), {})
        # Shards of one preprocessing run each carry the whole run's skip counts and
        # sources: take them once. Otherwise sum / concatenate them.
        one_run = all(s.get("shard") for s in sidecars) and len({str(s.get("run")) for s in sidecars}) == 1
        if one_run:
            skipped = dict(first.get("skipped", {}))
            sources = list(first.get("source_files", []))
        else:
            skipped = {}
            for s in sidecars:
                for reason, n in s.get("skipped", {}).items():
                    skipped[reason] = skipped.get(reason, 0) + n
            sources = [f for s in sidecars for f in s.get("source_files", [])]
        sidecar = {
            "format_version": SIDECAR_FORMAT_VERSION,
            "tool": tool_version().replace("preprocess", "merge"),
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": first.get("tokenizer"),
            "dtype": dtype.__name__,
            "documents": documents,
            "tokens": tokens,
            "max_token_id": max(maxima),
            "eod_per_document": bool(sidecars) and all(s.get("eod_per_document", False) for s in sidecars),
            "shard": None,
            "merged_from": [
                {"prefix": p, "documents": s.get("documents"), "tokens": s.get("tokens")}
                for p, s in zip(prefixes, sidecars)
            ],
            "source_files": sources,
            "skipped": skipped,
            "skipped_total": sum(skipped.values()),
        }
        if masks is not None:  # chat data (kind in CHAT_KINDS)
            # Chat data is read only with its own template and cut length: keep them.
            for key in ("chat_template", "chat_template_fingerprint", "seq_length"):
                sidecar[key] = first.get(key)
            sidecar["sequences"] = sum(s.get("sequences", 0) for s in sidecars)
            masks.commit({**sidecar, "role": "loss mask of " + Path(output_prefix).name})
        writer.commit(sidecar)
    except BaseException:
        writer.abort()
        if masks is not None:
            masks.abort()
        raise
    return sidecar
