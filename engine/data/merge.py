"""`data merge`: concatenate indexed datasets (e.g. preprocessing shards) into one.

Uses megatron-core's ``IndexedDatasetBuilder.add_index``; refuses inputs made with
different tokenizers or dtypes, since their token ids would not mean the same thing.
"""
from __future__ import annotations

import time
from typing import List, Sequence

from engine.data.indexed_writer import IndexedWriter, read_sidecar
from engine.data.preprocess import tool_version


class MergeError(ValueError):
    """The inputs cannot be merged."""


def normalize_prefix(path: str) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin``, ``PREFIX.idx`` or ``PREFIX.json``."""
    for suffix in (".bin", ".idx", ".json"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


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
        datasets.append(IndexedDataset(p, mmap=True))
        sidecars.append(read_sidecar(p) or {})
    dtypes = {ds.index.dtype for ds in datasets}
    if len(dtypes) > 1:
        raise MergeError(f"inputs have different token dtypes: {sorted(d.__name__ for d in dtypes)}")
    hashes = {s.get("tokenizer", {}).get("sha256") for s in sidecars} - {None}
    if len(hashes) > 1:
        raise MergeError(f"inputs were made with different tokenizers: {sorted(hashes)}")

    documents = sum(len(ds.document_indices) - 1 for ds in datasets)
    tokens = sum(int(ds.sequence_lengths.sum()) for ds in datasets)
    dtype = datasets[0].index.dtype
    del datasets  # release the memory maps before copying
    writer = IndexedWriter(output_prefix, dtype)
    try:
        for p in prefixes:
            writer.add_dataset(p)
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
            "format_version": 1,
            "tool": tool_version().replace("preprocess", "merge"),
            "kind": first.get("kind", "pretrain"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": first.get("tokenizer"),
            "dtype": dtype.__name__,
            "documents": documents,
            "tokens": tokens,
            "eod_per_document": bool(sidecars) and all(s.get("eod_per_document", False) for s in sidecars),
            "shard": None,
            "merged_from": [{"prefix": p, "documents": s.get("documents"), "tokens": s.get("tokens")}
                            for p, s in zip(prefixes, sidecars)],
            "source_files": sources,
            "skipped": skipped,
            "skipped_total": sum(skipped.values()),
        }
        writer.commit(sidecar)
    except BaseException:
        writer.abort()
        raise
    return sidecar
