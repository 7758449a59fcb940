"""Check every dataset of a run against its ``.idx``, its sidecar, the tokenizer and the model,
before the first step.

megatron-core reads whatever the ``.bin`` holds at the offsets the ``.idx`` gives: a ``.bin``
from another dataset, a truncated one, data of another kind or of another tokenizer all train
silently, and a token id the embedding has no row for fails deep inside the first step (a
device assert on GPU). :func:`verify_training_data` turns each of these into one
:class:`~engine.config.ConfigError` line naming the file and the numbers.

The checks cost the ``.idx`` (sizes) plus, only for data whose sidecar does not record
``max_token_id`` (older sidecars, or no sidecar, e.g. data written by megatron-core's own
tools), one chunked scan of the ``.bin`` whose result is cached in the run's data cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from engine.config import Config, ConfigError
from engine.data.chat_data import CHAT_KINDS, mask_prefix
from engine.data.indexed_writer import output_paths

# Elements per chunk of the max-token scan: 64 Mi tokens keeps memory flat on any .bin.
SCAN_CHUNK = 1 << 26
CACHE_SUBDIR = "token_max"


@dataclass
class IndexFacts:
    """What a ``.idx`` says about its ``.bin``."""

    dtype: type
    sequences: int
    documents: int
    tokens: int


def read_index(prefix: str) -> IndexFacts:
    """Counts of ``prefix.idx``, checked against the size of ``prefix.bin``.

    Raises ConfigError when either file is missing, the index is unreadable, or the ``.bin``
    is not exactly as long as the index implies (a truncated ``.bin`` or another dataset's
    ``.idx``)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    paths = output_paths(prefix)
    for ext in ("bin", "idx"):
        if not os.path.isfile(paths[ext]):
            raise ConfigError(f"{paths[ext]} does not exist")
    try:
        index = _IndexReader(paths["idx"], multimodal=False)
        lengths = index.sequence_lengths
        doc_idx = index.document_indices
        tokens = int(lengths.sum(dtype=np.int64))
        facts = IndexFacts(index.dtype, int(index.sequence_count), max(int(index.document_count) - 1, 0), tokens)
        consistent = len(doc_idx) >= 1 and int(doc_idx[0]) == 0 and int(doc_idx[-1]) == facts.sequences
    except (AssertionError, ValueError, KeyError, OSError) as exc:  # bad header, short file, bad dtype
        raise ConfigError(f"{paths['idx']} is not a readable megatron-core index ({exc})") from None
    if not consistent:
        raise ConfigError(
            f"{paths['idx']} is corrupt: its document index does not cover its {facts.sequences} sequences"
        )
    itemsize = np.dtype(facts.dtype).itemsize
    want, have = facts.tokens * itemsize, os.path.getsize(paths["bin"])
    if have != want:
        what = "truncated" if have < want else "longer than its index says"
        raise ConfigError(
            f"{paths['bin']} holds {have} bytes but {paths['idx']} describes {facts.tokens} "
            f"{np.dtype(facts.dtype).name} tokens = {want} bytes ({what}; the .bin/.idx pair "
            f"does not belong together)"
        )
    return facts


def scan_max_token_id(prefix: str, dtype, chunk: int = SCAN_CHUNK) -> int:
    """Largest token id in ``prefix.bin`` (-1 when empty), read in chunks of ``chunk`` tokens."""
    path = output_paths(prefix)["bin"]
    if os.path.getsize(path) == 0:
        return -1
    flat = np.memmap(path, dtype=dtype, mode="r")
    best = -1
    for lo in range(0, len(flat), chunk):
        best = max(best, int(flat[lo : lo + chunk].max()))
    del flat
    return best


def _cache_file(cache_dir: str, bin_path: str) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR / (hashlib.sha1(os.path.realpath(bin_path).encode()).hexdigest() + ".json")


def _file_key(prefix: str) -> dict:
    """What identifies the contents of a .bin/.idx pair cheaply: path, sizes and mtimes."""
    paths = output_paths(prefix)
    key = {"bin": os.path.realpath(paths["bin"])}
    for ext in ("bin", "idx"):
        st = os.stat(paths[ext])
        key[f"{ext}_bytes"], key[f"{ext}_mtime_ns"] = st.st_size, st.st_mtime_ns
    return key


def cached_max_token_id(prefix: str, dtype, cache_dir: Optional[str]) -> tuple:
    """``(max token id, whether it was scanned now)``; the scan's result is kept in
    ``cache_dir`` and reused while the files' sizes and modification times are unchanged."""
    key = _file_key(prefix)
    path = _cache_file(cache_dir, key["bin"]) if cache_dir else None
    if path is not None and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                return int(stored["max_token_id"]), False
        except (ValueError, KeyError, OSError):
            pass  # a broken cache entry is rescanned and rewritten
    value = scan_max_token_id(prefix, dtype)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may write at once: atomic rename
            tmp.write_text(json.dumps({"key": key, "max_token_id": value}), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the scan again next run
    return value, True


def _read_sidecar(prefix: str) -> Optional[dict]:
    path = output_paths(prefix)["json"]
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} is not a readable sidecar (not a JSON object)")
    return meta


def verify_dataset(
    prefix: str,
    kind: str,
    vocab_size: int,
    tokenizer_sha256: str = "",
    cache_dir: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> IndexFacts:
    """Check one dataset for an objective reading ``kind`` data with a model of ``vocab_size``
    tokens and (when non-empty) the tokenizer of hash ``tokenizer_sha256``; ConfigError on the
    first mismatch. Without a sidecar only what the ``.idx``/``.bin`` allow is checked."""
    facts = read_index(prefix)
    meta = _read_sidecar(prefix)
    sidecar = output_paths(prefix)["json"]
    max_id = None
    if meta is None:
        log(f"data: {prefix} has no sidecar (.json); checked sizes and token ids only")
    else:
        got_kind = meta.get("kind", "pretrain")
        if got_kind != kind:
            raise ConfigError(
                f"{sidecar} says kind {got_kind!r} but this objective reads {kind!r} data "
                f"(write it with `python -m engine preprocess --kind {kind}`)"
            )
        idx_dtype = np.dtype(facts.dtype).name
        for key, have in (
            ("documents", facts.documents),
            ("sequences", facts.sequences),
            ("tokens", facts.tokens),
            ("dtype", idx_dtype),
        ):
            if key in meta and meta[key] != have:
                raise ConfigError(
                    f"{sidecar} says {key}={meta[key]} but {prefix}.idx has {have}: the sidecar belongs to other data"
                )
        want = (meta.get("tokenizer") or {}).get("sha256")
        if want and tokenizer_sha256 and want != tokenizer_sha256:
            raise ConfigError(
                f"{sidecar} was written by tokenizer sha256 {want[:12]} but data.tokenizer has "
                f"sha256 {tokenizer_sha256[:12]}; preprocess it again with data.tokenizer"
            )
        if isinstance(meta.get("max_token_id"), int):
            max_id = meta["max_token_id"]
    if max_id is None:
        max_id, scanned = cached_max_token_id(prefix, facts.dtype, cache_dir)
        if scanned:
            log(
                f"data: scanned {prefix}.bin for its largest token id ({max_id}; "
                f"{'no sidecar' if meta is None else 'the sidecar does not record it'})"
            )
    if max_id >= vocab_size:
        raise ConfigError(
            f"{prefix}.bin holds token id {max_id} but model.vocab_size is {vocab_size} "
            f"(ids must be < vocab_size): the data was written by a larger tokenizer"
        )
    return facts


def dataset_kinds(kind: str, cfg: Config) -> List[tuple]:
    """``(prefix, kind)`` of every dataset an objective reading ``kind`` data opens."""
    out = [(p, kind) for p in cfg.data.paths]
    if kind == "sft" and cfg.data.replay_ratio > 0:
        out += [(p, "pretrain") for p in cfg.data.replay_paths]
    return out


def verify_training_data(
    kind: str, cfg: Config, tokenizer_sha256: str = "", log: Callable[[str], None] = print
) -> None:
    """Verify every dataset of the run (see :func:`verify_dataset`); chat data's loss-mask
    companion is checked to match its token dataset sequence for sequence."""
    if cfg.data.mock:
        return
    cache_dir = cfg.data.cache_dir or str(Path(cfg.checkpoint.dir) / "data_cache")
    for prefix, want in dataset_kinds(kind, cfg):
        facts = verify_dataset(prefix, want, cfg.model.vocab_size, tokenizer_sha256, cache_dir, log)
        if want in CHAT_KINDS:
            mask = read_index(mask_prefix(prefix))
            if (mask.sequences, mask.documents, mask.tokens) != (facts.sequences, facts.documents, facts.tokens):
                raise ConfigError(
                    f"{mask_prefix(prefix)}.idx has {mask.sequences} sequences / {mask.tokens} tokens "
                    f"but {prefix}.idx has {facts.sequences} / {facts.tokens}: the loss mask "
                    f"belongs to other data"
                )
