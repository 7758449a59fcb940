"""Input formats: JSONL (plain, .gz, .zst), plain text and parquet, read as a stream.

Reading is split in two so preprocessing can parallelise it:
:func:`iter_raw_chunks` (cheap, in the main process) yields batches of raw records with
their file and line numbers; :func:`decode_record` (in the workers) turns one raw record
into text or raises :class:`BadRecord` naming the file, the line and the reason.
:func:`iter_documents` chains both for single-process users (tokenizer training).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

# Reasons a record is rejected; the sidecar counts skipped records under these keys.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"
BAD_REASONS = (MALFORMED_JSON, MISSING_FIELD, INVALID_UTF8, EMPTY_DOCUMENT)

JSONL = "jsonl"
TEXT = "text"
PARQUET = "parquet"

# How plain-text files are cut into documents.
TEXT_DOC_LINE = "line"  # one document per line
TEXT_DOC_BLANK = "blank"  # documents separated by blank lines (newlines inside kept)
TEXT_DOC_FILE = "file"  # the whole file is one document
TEXT_DOC_MODES = (TEXT_DOC_LINE, TEXT_DOC_BLANK, TEXT_DOC_FILE)


class InputError(ValueError):
    """An input path or format problem (no file matched, unknown format, missing module)."""


class BadRecord(ValueError):
    """One input record is unusable; ``reason`` is one of :data:`BAD_REASONS`."""

    def __init__(self, path: str, line: int, reason: str, detail: str) -> None:
        self.path, self.line, self.reason, self.detail = path, line, reason, detail
        unit = "row" if str(path).endswith(".parquet") else "line"
        super().__init__(f"{path}:{unit} {line}: {reason}: {detail}")


@dataclass
class RawChunk:
    """A batch of undecoded records from one file, in order.

    ``records`` holds bytes (JSONL/text lines) or str/None (parquet cells);
    ``lines[i]`` is the 1-based line (or row) number of ``records[i]``; ``nbytes``
    counts the input bytes the chunk consumed (for progress and throughput).
    """

    path: str
    fmt: str
    json_key: str
    records: List[Union[bytes, str, None]] = field(default_factory=list)
    lines: List[int] = field(default_factory=list)
    nbytes: int = 0


def expand_inputs(patterns: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """Expand files and globs in the order given; error when a pattern matches nothing."""
    files: List[Path] = []
    for pattern in patterns:
        pattern = str(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise InputError(f"no input file matches {pattern!r}")
        for m in matches:
            if Path(m) not in files:
                files.append(Path(m))
    return files


def detect_format(path: Union[str, os.PathLike]) -> str:
    """Format of ``path`` from its name: jsonl / text / parquet (compression suffix ignored)."""
    name = str(path).lower()
    for suffix in (".gz", ".zst", ".zstd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".parquet"):
        return PARQUET
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return JSONL
    if name.endswith((".txt", ".text", ".md")):
        return TEXT
    raise InputError(f"cannot tell the format of {path} (expected .jsonl/.json/.txt/.parquet, optionally .gz/.zst)")


def open_binary(path: Union[str, os.PathLike]) -> io.BufferedIOBase:
    """Open ``path`` for streaming binary reads, decompressing .gz and .zst transparently."""
    name = str(path).lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as exc:
            raise InputError(f"{path}: reading .zst needs the 'zstandard' package (pip install zstandard)") from exc
        raw = open(path, "rb")
        # A stream reader keeps memory flat however large the file is.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _iter_line_records(path: Path, text_docs: str) -> Iterator[Tuple[int, bytes, int]]:
    """(line number, raw record, bytes consumed) for JSONL and plain-text files."""
    with open_binary(path) as f:
        if text_docs == TEXT_DOC_FILE:
            data = f.read()
            yield 1, data, len(data)
            return
        if text_docs == TEXT_DOC_BLANK:
            buf: List[bytes] = []
            start = consumed = 0
            for n, line in enumerate(f, 1):
                consumed += len(line)
                if line.strip(b" \t\r\n"):
                    if not buf:
                        start = n
                    buf.append(line)
                elif buf:
                    yield start, b"".join(buf).rstrip(b"\r\n"), consumed
                    buf, consumed = [], 0
            if buf or consumed:
                yield start, b"".join(buf).rstrip(b"\r\n"), consumed
            return
        for n, line in enumerate(f, 1):
            yield n, line.rstrip(b"\r\n"), len(line)


def _iter_parquet_records(path: Path, json_key: str, batch_rows: int) -> Iterator[Tuple[int, Optional[str], int]]:
    """(1-based row number, cell, its size) for a parquet column, one batch at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"{path}: reading parquet needs the 'pyarrow' package (pip install pyarrow)") from exc
    pf = pq.ParquetFile(path)
    if json_key not in pf.schema_arrow.names:
        raise BadRecord(str(path), 0, MISSING_FIELD, f"column {json_key!r} not in {pf.schema_arrow.names}")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[json_key]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, value, len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def iter_raw_chunks(
    files: Sequence[Path],
    json_key: str = "text",
    chunk_bytes: int = 1 << 20,
    chunk_records: int = 1024,
    text_docs: str = TEXT_DOC_LINE,
) -> Iterator[RawChunk]:
    """Stream every file as :class:`RawChunk` batches of about ``chunk_bytes`` each."""
    for path in files:
        fmt = detect_format(path)
        chunk = RawChunk(str(path), fmt, json_key)
        records: Iterator[Tuple[int, Union[bytes, str, None], int]]
        if fmt == PARQUET:
            records = _iter_parquet_records(path, json_key, chunk_records)
        else:
            records = _iter_line_records(path, text_docs if fmt == TEXT else TEXT_DOC_LINE)
        for line, rec, consumed in records:
            chunk.nbytes += consumed
            # Blank lines in JSONL are formatting, not records (a trailing newline, say);
            # in blank-separated text the trailing blank lines come as an empty record.
            # (rec is bytes for every format but parquet.)
            if isinstance(rec, bytes) and not rec.strip(b" \t\r\n") and (fmt == JSONL or text_docs == TEXT_DOC_BLANK):
                continue
            chunk.records.append(rec)
            chunk.lines.append(line)
            if chunk.nbytes >= chunk_bytes or len(chunk.records) >= chunk_records:
                yield chunk
                chunk = RawChunk(str(path), fmt, json_key)
        if chunk.records:
            yield chunk


def decode_record(path: str, fmt: str, json_key: str, line: int, rec: Union[bytes, str, None]) -> str:
    """Text of one raw record; raises :class:`BadRecord` for anything unusable."""
    if fmt == PARQUET:
        text = rec
        if text is None:
            raise BadRecord(path, line, MISSING_FIELD, f"{json_key!r} is null")
        if not isinstance(text, str):
            raise BadRecord(path, line, MISSING_FIELD, f"{json_key!r} is {type(text).__name__}, not a string")
    else:
        if not isinstance(rec, bytes):
            raise TypeError(f"{path}:{line}: a {fmt} record must be bytes, got {type(rec).__name__}")
        try:
            decoded = rec.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(path, line, INVALID_UTF8, str(exc)) from None
        if fmt == JSONL:
            try:
                obj = json.loads(decoded)
            except json.JSONDecodeError as exc:
                raise BadRecord(path, line, MALFORMED_JSON, str(exc)) from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise BadRecord(path, line, MISSING_FIELD, f"no {json_key!r} field")
            text = obj[json_key]
            if not isinstance(text, str):
                raise BadRecord(path, line, MISSING_FIELD, f"{json_key!r} is {type(text).__name__}, not a string")
            # json.loads accepts lone surrogates ("\ud800"), which cannot be encoded.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRecord(path, line, INVALID_UTF8, str(exc)) from None
        else:
            text = decoded
    if not text.strip():
        raise BadRecord(path, line, EMPTY_DOCUMENT, "the document is empty or only whitespace")
    return text


def iter_documents(
    files: Sequence[Path],
    json_key: str = "text",
    skip_bad: bool = False,
    skipped: Optional[Dict[str, int]] = None,
    text_docs: str = TEXT_DOC_LINE,
) -> Iterator[str]:
    """Yield document texts in order; bad records raise, or are counted in ``skipped``."""
    for chunk in iter_raw_chunks(files, json_key, text_docs=text_docs):
        for line, rec in zip(chunk.lines, chunk.records):
            try:
                yield decode_record(chunk.path, chunk.fmt, chunk.json_key, line, rec)
            except BadRecord as exc:
                if not skip_bad:
                    raise
                if skipped is not None:
                    skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
