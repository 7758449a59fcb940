"""Tokenize JSONL / text / parquet into megatron-core ``.bin/.idx`` files with a sidecar.

Pipeline: the main process streams raw records in ~1 MB chunks (:mod:`readers`), worker
processes decode, validate and tokenize each chunk (one EOS appended per document), and
the main process writes the results in input order. At most
``IN_FLIGHT_PER_WORKER x workers`` chunks are in flight, so memory stays flat whatever the
input size. Outputs are written under
``*.partial`` names and renamed only when the whole run succeeded (:mod:`indexed_writer`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Type

import numpy

from engine.data import readers
from engine.data.indexed_writer import SIDECAR_FORMAT_VERSION, IndexedWriter, token_dtype
from engine.data.preprocess_chat import preprocess_chat
from engine.data.preprocess_common import PreprocessError, tool_version
from engine.data.tokenizer import Tokenizer, load_tokenizer

KINDS = ("pretrain", "sft", "preference")  # sft / preference: engine/data/preprocess_chat.py
MAX_SKIPPED_EXAMPLES = 20
# Chunks (~1 MB each) queued per worker: enough to hide an uneven chunk, still flat memory.
IN_FLIGHT_PER_WORKER = 4
# Workers are single-threaded; without these, each one's numpy import starts a BLAS
# thread pool per core, which made 8 workers take ~2 s to start on a 16-core machine.
_WORKER_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class ChunkResult:
    """Tokens of the good documents of one chunk, concatenated, EOS after each."""

    tokens: numpy.ndarray
    lengths: numpy.ndarray
    nbytes: int
    skipped: Dict[str, int] = field(default_factory=dict)
    skipped_examples: List[str] = field(default_factory=list)
    error: Optional[str] = None


# --- worker side ------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(
    tokenizer: Tokenizer,
    dtype: Type[numpy.number],
    skip_bad: bool,
    crash_after: Optional[int],
    in_process: bool = False,
) -> None:
    """Per-process state; ``crash_after`` kills the worker after N chunks (tests only)."""
    _WORKER.update(
        tokenizer=tokenizer, dtype=dtype, skip_bad=skip_bad, crash_after=crash_after, in_process=in_process, done=0
    )


def encode_chunk(chunk: readers.RawChunk) -> ChunkResult:
    """Decode, validate and tokenize one chunk (runs in a worker or in-process)."""
    w = _WORKER
    if w["crash_after"] is not None and w["done"] >= w["crash_after"]:
        if w["in_process"]:
            raise RuntimeError("simulated failure mid-run")
        os._exit(3)  # simulate a worker process killed mid-run
    w["done"] += 1
    tok: Tokenizer = w["tokenizer"]
    texts: List[str] = []
    skipped: Dict[str, int] = {}
    examples: List[str] = []
    for line, rec in zip(chunk.lines, chunk.records):
        try:
            texts.append(readers.decode_record(chunk.path, chunk.fmt, chunk.json_key, line, rec))
        except readers.BadRecord as exc:
            if not w["skip_bad"]:
                empty = numpy.empty(0, dtype=w["dtype"])
                return ChunkResult(empty, numpy.empty(0, numpy.int64), chunk.nbytes, error=str(exc))
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            if len(examples) < MAX_SKIPPED_EXAMPLES:
                examples.append(str(exc))
    encoded = tok.encode_batch(texts)
    lengths = numpy.fromiter((len(ids) + 1 for ids in encoded), dtype=numpy.int64, count=len(encoded))
    tokens = numpy.empty(int(lengths.sum()), dtype=w["dtype"])
    pos = 0
    for ids in encoded:
        n = len(ids)
        tokens[pos : pos + n] = ids
        tokens[pos + n] = tok.eod
        pos += n + 1
    return ChunkResult(tokens, lengths, chunk.nbytes, skipped, examples)


# --- main side --------------------------------------------------------------------------
def _ordered_results(
    chunks: Iterator[readers.RawChunk],
    workers: int,
    initargs: Tuple[Tokenizer, Type[numpy.number], bool, Optional[int]],
) -> Iterator[ChunkResult]:
    """Encode chunks in order with a bounded number in flight."""
    if workers <= 1:
        _init_worker(*initargs, in_process=True)
        for chunk in chunks:
            yield encode_chunk(chunk)
        return
    import multiprocessing

    # spawn: workers never inherit the parent's threads or open files.
    ctx = multiprocessing.get_context("spawn")
    with (
        _environ(_WORKER_THREAD_ENV),
        ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=initargs) as pool,
    ):
        pending: collections.deque = collections.deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(encode_chunk, chunk))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


@contextlib.contextmanager
def _environ(values: Dict[str, str]):
    """Set environment variables (inherited by spawned workers) and restore them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shard_prefix(prefix: str, index: int) -> str:
    """Output prefix of shard ``index``."""
    return f"{prefix}_{index:05d}"


def preprocess(
    inputs: Sequence[str],
    tokenizer: str,
    output_prefix: str,
    workers: int = 1,
    json_key: str = "text",
    skip_bad: bool = False,
    shard_docs: int = 0,
    kind: str = "pretrain",
    text_docs: str = readers.TEXT_DOC_LINE,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
    chat_template: str = "chatml",
    seq_length: int = 2048,
    _crash_worker_after: Optional[int] = None,
) -> dict:
    """Tokenize ``inputs`` into ``output_prefix`` (.bin/.idx/.json, or numbered shards).

    Returns a summary (prefixes written, documents, tokens, skipped counts). Raises
    :class:`PreprocessError` for bad input (unless ``skip_bad``) or a failed worker;
    then no final file exists.
    """
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} is not supported yet (supported: {', '.join(KINDS)})")
    if kind != "pretrain":
        return preprocess_chat(
            inputs,
            tokenizer,
            output_prefix,
            kind,
            chat_template=chat_template,
            seq_length=seq_length,
            skip_bad=skip_bad,
        )
    if shard_docs < 0:
        raise ValueError("--shard-docs must be >= 0")
    files = readers.expand_inputs(inputs)
    for f in files:
        readers.detect_format(f)  # fail on an unknown format before any work
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    started = time.time()
    writers: List[IndexedWriter] = []
    skipped: Dict[str, int] = {}
    examples: List[str] = []
    docs = toks = nbytes = 0

    def new_writer() -> IndexedWriter:
        prefix = shard_prefix(output_prefix, len(writers)) if shard_docs else output_prefix
        writers.append(IndexedWriter(prefix, dtype))
        return writers[-1]

    bar = _progress_bar(files, progress)
    try:
        writer = new_writer()
        chunks = readers.iter_raw_chunks(files, json_key, chunk_bytes=chunk_bytes, text_docs=text_docs)
        for result in _ordered_results(chunks, workers, (tok, dtype, skip_bad, _crash_worker_after)):
            if result.error:
                raise PreprocessError(result.error + ("" if skip_bad else "  (use --skip-bad to skip bad records)"))
            for reason, n in result.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            examples.extend(result.skipped_examples[: MAX_SKIPPED_EXAMPLES - len(examples)])
            pos = 0
            for length in result.lengths.tolist():
                if shard_docs and writer.documents >= shard_docs:
                    writer.finalize()
                    writer = new_writer()
                writer.add_document(result.tokens[pos : pos + length])
                pos += length
            docs += len(result.lengths)
            toks += len(result.tokens)
            nbytes += result.nbytes
            if bar is not None:
                bar.update(result.nbytes)
                elapsed = max(time.time() - started, 1e-9)
                bar.set_postfix(docs=docs, tok_s=f"{toks / elapsed:,.0f}", refresh=False)
        if docs == 0:
            raise PreprocessError(f"no documents in {', '.join(map(str, files))}")
        elapsed = time.time() - started
        summary = {
            "documents": docs,
            "tokens": toks,
            "input_bytes": nbytes,
            "seconds": round(elapsed, 3),
            "skipped": skipped,
            "prefixes": [w.prefix for w in writers],
        }
        for i, w in enumerate(writers):
            w.commit(
                _sidecar(w, i, len(writers), bool(shard_docs), tok, files, json_key, kind, workers, summary, examples)
            )
        return summary
    except BaseException:
        # Includes KeyboardInterrupt and a broken worker pool: remove every partial file.
        for w in writers:
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


def _progress_bar(files: Sequence[Path], enabled: bool):
    """A tqdm bar over input bytes (ETA from uncompressed file sizes), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    compressed = any(str(f).lower().endswith((".gz", ".zst", ".zstd", ".parquet")) for f in files)
    total = None if compressed else sum(os.path.getsize(f) for f in files)
    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", mininterval=1.0)


def _abspath(path) -> str:
    """Absolute form of a recorded path: a relative one would resolve against whatever
    directory a later reader runs in."""
    return os.path.abspath(path) if path else ""


def _sidecar(
    writer: IndexedWriter,
    index: int,
    count: int,
    sharded: bool,
    tok: Tokenizer,
    files,
    json_key: str,
    kind: str,
    workers: int,
    summary: dict,
    examples: List[str],
) -> dict:
    """Metadata stored next to one output prefix."""
    return {
        "format_version": SIDECAR_FORMAT_VERSION,
        "tool": tool_version(),
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "trained_vocab_size": tok.trained_vocab_size,
            "eod": tok.eod,
            "path": _abspath(getattr(tok, "path", "")),
        },
        "dtype": numpy.dtype(writer.dtype).name,
        "documents": writer.documents,
        "tokens": writer.tokens,
        "max_token_id": writer.max_token_id,
        "eod_per_document": True,
        "shard": {"index": index, "count": count} if sharded else None,
        "run": {
            "documents": summary["documents"],
            "tokens": summary["tokens"],
            "input_bytes": summary["input_bytes"],
            "seconds": summary["seconds"],
            "workers": workers,
        },
        "json_key": json_key,
        "source_files": [{"path": str(f), "bytes": os.path.getsize(f)} for f in files],
        "skipped": dict(summary["skipped"]),
        "skipped_total": sum(summary["skipped"].values()),
        "skipped_examples": examples,
    }
