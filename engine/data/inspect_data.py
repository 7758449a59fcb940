"""`data inspect`: statistics of an indexed dataset and a few decoded documents."""

from __future__ import annotations

import os
from typing import Optional

import numpy

from engine.data.indexed_writer import output_paths, read_sidecar


def inspect_dataset(prefix: str, tokenizer: Optional[str] = None, num_docs: int = 3) -> dict:
    """Read ``prefix`` with megatron-core and return stats plus ``num_docs`` decoded samples.

    The tokenizer defaults to the one recorded in the sidecar (a relative path there is taken
    relative to the sidecar's directory); its hash is checked against the sidecar's. When no
    tokenizer is found, ``warnings`` says so and which checks were skipped. A missing file, an
    unreadable index or a ``.bin`` of another length than the ``.idx`` implies raises
    ``ValueError`` (``FileNotFoundError`` for a missing file) with one line naming the file.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from engine.data.merge import normalize_prefix
    from engine.data.tokenizer import load_tokenizer
    from engine.data.verify import read_index

    prefix = normalize_prefix(prefix)
    for path in output_paths(prefix)["bin"], output_paths(prefix)["idx"]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (expected PREFIX.bin and PREFIX.idx)")
    read_index(prefix)  # the .bin must be as long as the .idx says before anything reads it
    ds = IndexedDataset(prefix, mmap=True)
    sidecar = read_sidecar(prefix) or {}
    doc_idx = ds.document_indices
    seq_lens = ds.sequence_lengths.astype(numpy.int64)
    # Document length = the sum of its sequences (preprocessing writes one per document).
    bounds = numpy.concatenate([[0], numpy.cumsum(seq_lens)])
    doc_lens = bounds[doc_idx[1:]] - bounds[doc_idx[:-1]]
    paths = output_paths(prefix)
    stats = {
        "prefix": prefix,
        "dtype": ds.index.dtype.__name__,
        "bin_bytes": os.path.getsize(paths["bin"]),
        "idx_bytes": os.path.getsize(paths["idx"]),
        "documents": int(len(doc_lens)),
        "sequences": int(len(seq_lens)),
        "tokens": int(seq_lens.sum()),
        "doc_tokens": (
            {
                "min": int(doc_lens.min()),
                "mean": round(float(doc_lens.mean()), 1),
                "p50": int(numpy.percentile(doc_lens, 50)),
                "p99": int(numpy.percentile(doc_lens, 99)),
                "max": int(doc_lens.max()),
            }
            if len(doc_lens)
            else None
        ),
        "sidecar": bool(sidecar),
        "problems": [],
        "warnings": [],
    }
    if sidecar:
        for key in ("documents", "tokens"):
            if sidecar.get(key) != stats[key]:
                stats["problems"].append(f"sidecar says {key}={sidecar.get(key)}, the index has {stats[key]}")
        if sidecar.get("dtype") != stats["dtype"]:
            stats["problems"].append(f"sidecar says dtype={sidecar.get('dtype')}, the index has {stats['dtype']}")
    tok = None
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        recorded = (sidecar.get("tokenizer") or {}).get("path")
        tok_path = sidecar_relative(recorded, paths["json"]) if recorded else None
        if tok_path and os.path.exists(tok_path):
            tok = load_tokenizer(tok_path)
        else:
            where = f"the sidecar's tokenizer {tok_path} does not exist" if tok_path else "no tokenizer is known"
            stats["warnings"].append(
                f"{where}; the end-of-document check and the decoded samples were skipped (pass --tokenizer)"
            )
    samples = []
    if tok is not None:
        want = (sidecar.get("tokenizer") or {}).get("sha256")
        if want and want != tok.sha256:
            stats["problems"].append(f"tokenizer sha256 {tok.sha256[:12]} differs from the sidecar's {want[:12]}")
        # Every document must end with EOD; read all last tokens at once from the .bin.
        flat = numpy.memmap(paths["bin"], dtype=ds.index.dtype, mode="r")
        ends = bounds[doc_idx[1:]][doc_lens > 0]
        missing_eod = int((flat[ends - 1] != tok.eod).sum()) + int((doc_lens == 0).sum())
        del flat
        stats["documents_without_final_eod"] = missing_eod
        for d in range(min(num_docs, len(doc_lens))):
            ids = numpy.concatenate([ds[i] for i in range(int(doc_idx[d]), int(doc_idx[d + 1]))])
            samples.append({"document": d, "tokens": int(ids.size), "text": tok.decode(ids.tolist())})
    stats["samples"] = samples
    return stats


def sidecar_relative(path: str, sidecar_path: str) -> str:
    """``path`` as recorded in a sidecar: absolute as is, relative to the sidecar's directory."""
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(sidecar_path)), path)


def format_inspection(stats: dict, sidecar: Optional[dict] = None) -> str:
    """Human-readable report of :func:`inspect_dataset`."""
    lines = [
        f"{stats['prefix']}: {stats['documents']} documents, {stats['tokens']} tokens, dtype {stats['dtype']}",
        f"  files: .bin {stats['bin_bytes']:,} B, .idx {stats['idx_bytes']:,} B, sidecar {'yes' if stats['sidecar'] else 'NO'}",
    ]
    if stats["doc_tokens"]:
        d = stats["doc_tokens"]
        lines.append(
            f"  tokens/document: min {d['min']}  mean {d['mean']}  p50 {d['p50']}  p99 {d['p99']}  max {d['max']}"
        )
    if "documents_without_final_eod" in stats:
        lines.append(f"  documents without a final EOD: {stats['documents_without_final_eod']}")
    if sidecar:
        tok = sidecar.get("tokenizer") or {}
        lines.append(
            f"  tokenizer sha256 {str(tok.get('sha256'))[:16]}  vocab {tok.get('vocab_size')}  "
            f"skipped records {sidecar.get('skipped_total', 0)}  tool {sidecar.get('tool')}"
        )
    for p in stats["problems"]:
        lines.append(f"  PROBLEM: {p}")
    for w in stats.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    for s in stats["samples"]:
        text = s["text"] if len(s["text"]) <= 400 else s["text"][:400] + " ..."
        lines.append(f"--- document {s['document']} ({s['tokens']} tokens) ---\n{text}")
    return "\n".join(lines)
