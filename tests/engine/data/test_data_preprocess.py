"""Preprocessing to megatron-core .bin/.idx: correctness, formats, bad input, interruption."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy
import pytest
from data_test_helpers import SAMPLE, sample_docs

from engine.data.indexed_writer import token_dtype
from engine.data.preprocess import PreprocessError, preprocess
from engine.data.readers import BadRecord
from engine.data.tokenizer import load_tokenizer


def read_docs(prefix) -> list:
    """Every document of ``prefix`` as a list of ids, read with megatron-core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    idx = ds.document_indices
    return [numpy.concatenate([ds[j] for j in range(idx[i], idx[i + 1])]).tolist() for i in range(len(idx) - 1)]


def final_files(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir())


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def test_documents_equal_tokenizer_output_plus_eos(tmp_path, unigram_dir):
    summary = preprocess([str(SAMPLE)], str(unigram_dir), str(tmp_path / "out"), progress=False)
    tok = load_tokenizer(unigram_dir)
    texts = sample_docs()
    docs = read_docs(tmp_path / "out")
    assert len(docs) == len(texts) == 296
    for text, doc in zip(texts, docs):
        assert doc == tok.encode(text) + [tok.eod]
    side = json.loads((tmp_path / "out.json").read_text())
    assert side["documents"] == summary["documents"] == 296
    assert side["tokens"] == summary["tokens"] == sum(len(d) for d in docs)
    assert side["dtype"] == "uint16"
    assert side["tokenizer"]["sha256"] == tok.sha256 and side["tokenizer"]["vocab_size"] == 1024
    assert side["source_files"][0]["path"] == str(SAMPLE) and side["skipped_total"] == 0
    assert side["tool"].startswith("engine.data.preprocess")
    assert final_files(tmp_path) == ["out.bin", "out.idx", "out.json"]


def test_two_workers_write_identical_files(tmp_path, unigram_dir):
    preprocess([str(SAMPLE)], str(unigram_dir), str(tmp_path / "a"), workers=1, progress=False)
    preprocess([str(SAMPLE)], str(unigram_dir), str(tmp_path / "b"), workers=2, progress=False, chunk_bytes=64 << 10)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_dtype_switches_at_vocab_threshold(tmp_path, unigram_dir):
    assert token_dtype(32000) == numpy.uint16
    assert token_dtype(65408) == numpy.uint16
    assert token_dtype(65536) == numpy.int32
    # Same model, sidecar padded to 65536: the data is written as int32 and reads back equal.
    big = tmp_path / "tok65536"
    shutil.copytree(unigram_dir, big)
    meta = json.loads((big / "tokenizer_meta.json").read_text())
    meta.update(vocab_size=65536, vocab_multiple=65536)
    (big / "tokenizer_meta.json").write_text(json.dumps(meta))
    src = write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in sample_docs(20)])
    preprocess([str(src)], str(unigram_dir), str(tmp_path / "u16"), progress=False)
    preprocess([str(src)], str(big), str(tmp_path / "i32"), progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert IndexedDataset(str(tmp_path / "u16")).index.dtype == numpy.uint16
    assert IndexedDataset(str(tmp_path / "i32")).index.dtype == numpy.int32
    assert json.loads((tmp_path / "i32.json").read_text())["dtype"] == "int32"
    assert read_docs(tmp_path / "u16") == read_docs(tmp_path / "i32")


def test_input_formats(tmp_path, unigram_dir):
    tok = load_tokenizer(unigram_dir)
    texts = ["첫 문서\n둘째 줄", "second document\twith tab", "세 번째  문서 😀"]
    rows = [{"body": t, "id": i} for i, t in enumerate(texts)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.jsonl").read_bytes()))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    expected = [tok.encode(t) + [tok.eod] for t in texts]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        prefix = tmp_path / f"out_{name.replace('.', '_')}"
        preprocess([str(tmp_path / name)], str(unigram_dir), str(prefix), json_key="body", progress=False)
        assert read_docs(prefix) == expected, name
    # Plain text: one document per line, or documents separated by blank lines.
    (tmp_path / "lines.txt").write_text("one line\n두 번째 줄\n", encoding="utf-8")
    preprocess([str(tmp_path / "lines.txt")], str(unigram_dir), str(tmp_path / "t1"), progress=False)
    assert read_docs(tmp_path / "t1") == [tok.encode(t) + [tok.eod] for t in ["one line", "두 번째 줄"]]
    (tmp_path / "blank.txt").write_text("doc one\nline two\n\n\ndoc two\n", encoding="utf-8")
    preprocess([str(tmp_path / "blank.txt")], str(unigram_dir), str(tmp_path / "t2"), text_docs="blank", progress=False)
    assert read_docs(tmp_path / "t2") == [tok.encode(t) + [tok.eod] for t in ["doc one\nline two", "doc two"]]
    # A glob picks files in sorted order.
    preprocess([str(tmp_path / "a.jsonl*")], str(unigram_dir), str(tmp_path / "g"), json_key="body", progress=False)
    assert len(read_docs(tmp_path / "g")) == 3 * 3


BAD_CASES = {
    "malformed_json": b'{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n',
    "missing_field": b'{"text": "ok"}\n{"other": "x"}\n{"text": "fine"}\n',
    "invalid_utf8": b'{"text": "ok"}\n{"text": "bad \xff\xfe byte"}\n{"text": "fine"}\n',
    "empty_document": b'{"text": "ok"}\n{"text": "  \\n "}\n{"text": "fine"}\n',
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_input_errors_name_file_and_line(tmp_path, unigram_dir, reason):
    src = tmp_path / "in.jsonl"
    src.write_bytes(BAD_CASES[reason])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PreprocessError) as err:
        preprocess([str(src)], str(unigram_dir), str(out / "data"), progress=False)
    assert f"{src}:line 2: {reason}" in str(err.value)
    assert final_files(out) == []  # no partial or final file left behind

    summary = preprocess([str(src)], str(unigram_dir), str(out / "data"), skip_bad=True, progress=False)
    assert summary["documents"] == 2 and summary["skipped"] == {reason: 1}
    side = json.loads((out / "data.json").read_text())
    assert side["skipped"] == {reason: 1} and side["skipped_total"] == 1 and side["documents"] == 2
    assert side["skipped_examples"][0].startswith(f"{src}:line 2")


def test_cli_reports_bad_input(tmp_path, unigram_dir, capsys):
    from engine.cli import main

    src = tmp_path / "in.jsonl"
    src.write_bytes(BAD_CASES["malformed_json"])
    rc = main(
        [
            "preprocess",
            "--input",
            str(src),
            "--tokenizer",
            str(unigram_dir),
            "--output-prefix",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{src}:line 2: malformed_json" in err and "no output written" in err
    assert not list(tmp_path.glob("o*"))
    with pytest.raises(SystemExit):
        main(
            [
                "preprocess",
                "--input",
                str(src),
                "--tokenizer",
                str(unigram_dir),
                "--output-prefix",
                str(tmp_path / "o"),
                "--kind",
                "no-such-kind",
            ]
        )


def test_killed_worker_leaves_no_complete_output(tmp_path, unigram_dir):
    from concurrent.futures.process import BrokenProcessPool

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BrokenProcessPool):
        preprocess(
            [str(SAMPLE)],
            str(unigram_dir),
            str(out / "data"),
            workers=2,
            progress=False,
            chunk_bytes=32 << 10,
            shard_docs=50,
            _crash_worker_after=2,
        )
    assert final_files(out) == []


def test_exception_mid_run_leaves_no_complete_output(tmp_path, unigram_dir, monkeypatch):
    from engine.data import indexed_writer

    original = indexed_writer.IndexedWriter.add_document
    calls = {"n": 0}

    def failing(self, tokens):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt  # e.g. Ctrl-C mid-run
        original(self, tokens)

    monkeypatch.setattr(indexed_writer.IndexedWriter, "add_document", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(SAMPLE)], str(unigram_dir), str(out / "data"), shard_docs=100, progress=False)
    assert final_files(out) == []


def test_shards_then_merge_equal_single_output(tmp_path, unigram_dir):
    from engine.cli import main

    assert (
        main(
            [
                "preprocess",
                "--input",
                str(SAMPLE),
                "--tokenizer",
                str(unigram_dir),
                "--output-prefix",
                str(tmp_path / "whole"),
                "--no-progress",
            ]
        )
        == 0
    )
    summary = preprocess(
        [str(SAMPLE)],
        str(unigram_dir),
        str(tmp_path / "sh"),
        shard_docs=100,
        workers=2,
        progress=False,
        chunk_bytes=64 << 10,
    )
    assert [Path(p).name for p in summary["prefixes"]] == ["sh_00000", "sh_00001", "sh_00002"]
    counts = [json.loads(Path(p + ".json").read_text())["documents"] for p in summary["prefixes"]]
    assert counts == [100, 100, 96]
    assert main(["data", "merge", "--inputs", *summary["prefixes"], "--output-prefix", str(tmp_path / "merged")]) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"whole{ext}").read_bytes()
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert (
        merged["documents"] == 296 and merged["tokens"] == json.loads((tmp_path / "whole.json").read_text())["tokens"]
    )


def test_merge_refuses_mixed_tokenizers(tmp_path, unigram_dir, bpe_dir):
    from engine.data.merge import MergeError, merge_datasets

    src = write_jsonl(tmp_path / "s.jsonl", [{"text": "하나"}, {"text": "two"}])
    preprocess([str(src)], str(unigram_dir), str(tmp_path / "u"), progress=False)
    preprocess([str(src)], str(bpe_dir), str(tmp_path / "b"), progress=False)
    with pytest.raises(MergeError, match="different tokenizers"):
        merge_datasets([str(tmp_path / "u"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert not (tmp_path / "m.bin").exists()


def test_inspect(tmp_path, unigram_dir, capsys):
    from engine.cli import main
    from engine.data.inspect_data import inspect_dataset

    preprocess([str(SAMPLE)], str(unigram_dir), str(tmp_path / "d"), progress=False)
    stats = inspect_dataset(str(tmp_path / "d"), num_docs=2)
    assert stats["documents"] == 296 and stats["problems"] == []
    assert stats["documents_without_final_eod"] == 0
    assert [s["text"] for s in stats["samples"]] == [
        load_tokenizer(unigram_dir).decode(load_tokenizer(unigram_dir).encode(t)) for t in sample_docs(2)
    ]
    assert main(["data", "inspect", str(tmp_path / "d.bin"), "--num-docs", "1"]) == 0
    assert "296 documents" in capsys.readouterr().out


def test_decode_record_reasons():
    from engine.data.readers import decode_record

    assert decode_record("f", "jsonl", "text", 1, b'{"text": "x"}') == "x"
    with pytest.raises(BadRecord, match="missing_field"):
        decode_record("f", "jsonl", "text", 3, b'{"text": 5}')
    with pytest.raises(BadRecord, match="invalid_utf8"):
        decode_record("f", "jsonl", "text", 3, b'{"text": "\\ud800"}')  # lone surrogate
