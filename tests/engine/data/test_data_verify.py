"""`train` checks its data before the first step: files that disagree with their index or their
sidecar, data of another kind or tokenizer, token ids beyond the model's vocabulary, splits that
would make megatron-core loop forever; `data merge` / `data inspect` on such data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from data_test_helpers import sample_docs

from engine.config import ConfigError, from_dict
from engine.data.preprocess import preprocess
from engine.data.verify import verify_dataset, verify_training_data
from models.presets import get_preset
from tests.conftest import base_config, run_engine, write_synthetic_dataset


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pretrain_data(tmp_path: Path, tok_dir, name: str, docs: slice = slice(0, 60)) -> str:
    src = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t} for t in sample_docs(200)[docs]])
    preprocess([str(src)], str(tok_dir), str(tmp_path / name), progress=False)
    return str(tmp_path / name)


def chat_data(tmp_path: Path, tok_dir, name: str, kind: str, n: int = 12) -> str:
    if kind == "sft":
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"질문 {i}?"},
                    {"role": "assistant", "content": f"The answer is {i}."},
                ]
            }
            for i in range(n)
        ]
    else:
        rows = [{"prompt": f"질문 {i}?", "chosen": f"Good answer {i}.", "rejected": f"bad {i}"} for i in range(n)]
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    preprocess([str(src)], str(tok_dir), str(tmp_path / name), kind=kind, seq_length=128, progress=False)
    return str(tmp_path / name)


def config(tmp_path: Path, paths, tokenizer=None, vocab: int = 256, **data):
    values = base_config(paths[0], tmp_path / "run")
    values["data"].update(paths=list(paths), **data)
    values["model"]["vocab_size"] = vocab
    if tokenizer is not None:
        values["data"]["tokenizer"] = str(tokenizer)
    return from_dict(values, presets=get_preset)


def verify(cfg, kind="pretrain", sha="", logs=None):
    verify_training_data(kind, cfg, sha, log=(logs.append if logs is not None else lambda m: None))


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# --- .bin/.idx pairs ------------------------------------------------------------------------
def test_idx_of_another_dataset_is_named(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 40, seed=1)
    b = write_synthetic_dataset(tmp_path / "b", 30, seed=2)
    shutil.copy(f"{b}.idx", f"{a}.idx")
    with pytest.raises(ConfigError) as e:
        verify(config(tmp_path, [str(a)]))
    assert f"{a}.bin holds" in one_line(e) and "does not belong together" in str(e.value)


def test_truncated_bin_is_named(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", 40)
    size = os.path.getsize(f"{a}.bin")
    with open(f"{a}.bin", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ConfigError) as e:
        verify(config(tmp_path, [str(a)]))
    assert f"{a}.bin holds {size - 100} bytes" in one_line(e) and f"= {size} bytes (truncated" in str(e.value)


def test_sidecar_of_other_data_is_named(tmp_path, unigram_dir):
    x = pretrain_data(tmp_path, unigram_dir, "x", slice(0, 60))
    y = pretrain_data(tmp_path, unigram_dir, "y", slice(60, 100))
    for ext in (".bin", ".idx"):  # files replaced, the old sidecar left behind
        shutil.copy(y + ext, x + ext)
    cfg = config(tmp_path, [x], unigram_dir, vocab=1024)
    with pytest.raises(ConfigError) as e:
        verify(cfg)
    assert f"{x}.json says documents=60 but {x}.idx has 40" in one_line(e)


def test_data_of_another_tokenizer_of_the_same_size_is_refused(tmp_path, unigram_dir, bpe_dir):
    from engine.data.tokenizer import load_tokenizer

    data = pretrain_data(tmp_path, bpe_dir, "bpe")
    run_tok = load_tokenizer(str(unigram_dir))
    assert run_tok.vocab_size == load_tokenizer(str(bpe_dir)).vocab_size == 1024
    with pytest.raises(ConfigError) as e:
        verify(config(tmp_path, [data], unigram_dir, vocab=1024), sha=run_tok.sha256)
    assert f"{data}.json was written by tokenizer sha256" in one_line(e) and run_tok.sha256[:12] in str(e.value)


@pytest.mark.parametrize("written, read", [("preference", "pretrain"), ("sft", "preference")])
def test_data_of_another_kind_is_refused(tmp_path, unigram_dir, written, read):
    data = chat_data(tmp_path, unigram_dir, "chat", written)
    with pytest.raises(ConfigError) as e:
        verify(config(tmp_path, [data], unigram_dir, vocab=1024), kind=read)
    assert f"{data}.json says kind {written!r} but this objective reads {read!r}" in one_line(e)


def test_pretraining_data_as_sft_replay_is_checked_too(tmp_path, unigram_dir):
    sft = chat_data(tmp_path, unigram_dir, "sft", "sft")
    pref = chat_data(tmp_path, unigram_dir, "pref", "preference")
    cfg = config(tmp_path, [sft], unigram_dir, vocab=1024, replay_paths=[pref], replay_ratio=0.3)
    with pytest.raises(ConfigError, match=rf"{pref}.json says kind 'preference' but this objective reads 'pretrain'"):
        verify(cfg, kind="sft")


def test_loss_mask_of_other_data_is_named(tmp_path, unigram_dir):
    a = chat_data(tmp_path, unigram_dir, "a", "sft", 12)
    b = chat_data(tmp_path, unigram_dir, "b", "sft", 7)
    for ext in (".bin", ".idx"):
        shutil.copy(f"{b}_lossmask{ext}", f"{a}_lossmask{ext}")
    with pytest.raises(ConfigError) as e:
        verify(config(tmp_path, [a], unigram_dir, vocab=1024), kind="sft")
    assert f"{a}_lossmask.idx has 7 sequences" in one_line(e)


# --- token ids against the model's vocabulary ---------------------------------------------
def test_token_ids_beyond_the_vocabulary_without_sidecar_and_a_cache_whose_file_changed(tmp_path):
    prefix = write_synthetic_dataset(tmp_path / "syn", 40, vocab=250)  # ids 0..250, no sidecar
    cfg = config(tmp_path, [str(prefix)])
    logs = []
    verify(cfg, logs=logs)  # 250 < 256
    assert any("has no sidecar" in m for m in logs) and any("largest token id (250" in m for m in logs)
    logs.clear()
    verify(cfg, logs=logs)  # cached: no second scan
    assert not any("scanned" in m for m in logs)
    write_synthetic_dataset(tmp_path / "syn", 40, vocab=300)  # the same files rewritten: the cache is stale
    with pytest.raises(ConfigError) as e:
        verify(cfg)
    assert f"{prefix}.bin holds token id 300 but model.vocab_size is 256" in one_line(e)


def test_sidecar_max_token_id_is_used_without_a_scan(tmp_path, unigram_dir, monkeypatch):
    import engine.data.verify as verify_mod

    data = pretrain_data(tmp_path, unigram_dir, "d")
    recorded = json.loads(Path(data + ".json").read_text())["max_token_id"]
    assert 0 < recorded < 1000
    monkeypatch.setattr(verify_mod, "scan_max_token_id", lambda *a, **k: pytest.fail("scanned"))
    verify(config(tmp_path, [data], unigram_dir, vocab=1024))
    # The model is smaller than the tokenizer that wrote the data (no data.tokenizer given).
    with pytest.raises(ConfigError, match=rf"{data}.bin holds token id {recorded} but model.vocab_size is 256"):
        verify_dataset(data, "pretrain", 256)


def test_train_cli_exits_2_with_one_line_naming_the_file(tmp_path):
    prefix = write_synthetic_dataset(tmp_path / "syn", 60)
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(os.path.getsize(f"{prefix}.bin") // 2)
    proc = run_engine(base_config(str(prefix), tmp_path / "run"), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and f"{prefix}.bin holds" in errors[0] and "truncated" in errors[0], proc.stderr


# --- splits that hold no sequence -----------------------------------------------------------
@contextlib.contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the test when the body runs longer than ``seconds``."""

    def _raise(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (megatron-core's endless epoch loop)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_long_document(prefix: Path, tokens: int) -> Path:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    builder.add_item(torch.tensor(np.append(np.arange(tokens) % 250 + 1, 0).astype(np.int64)))
    builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.mark.parametrize("case", ["ten_documents_98_1_1", "one_document_90_5_5"])
def test_split_without_documents_does_not_hang_when_evaluation_is_off(tmp_path, case):
    from engine.data.gpt_data import build_datasets

    if case.startswith("ten"):
        prefix, split = write_synthetic_dataset(tmp_path / "ten", 10), "98,1,1"
    else:
        prefix, split = one_long_document(tmp_path / "one", 200_000), "90,5,5"
    cfg = config(tmp_path, [str(prefix)], split=split)
    with deadline(60):
        train, valid, test = build_datasets(cfg, 40, 0)
    assert len(train) >= 40 and valid is None and test is None
    # With evaluation on, the empty validation split is refused, not looped over.
    with deadline(60), pytest.raises(ConfigError, match=r"the valid split of .* holds 0 documents"):
        build_datasets(cfg, 40, 8)


# --- data merge / data inspect ---------------------------------------------------------------
def test_merge_refuses_mixed_kinds(tmp_path, unigram_dir, capsys):
    from engine.cli import main

    pre = pretrain_data(tmp_path, unigram_dir, "pre")
    pref = chat_data(tmp_path, unigram_dir, "pref", "preference")
    assert main(["data", "merge", "--inputs", pre, pref, "--output-prefix", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: inputs are different kinds of data: {pre} is pretrain, {pref} is preference"
    assert not list(tmp_path.glob("m*"))


def test_merged_sft_data_keeps_its_loss_mask_and_trains(tmp_path, unigram_dir):
    from engine.data.merge import merge_datasets

    a = chat_data(tmp_path, unigram_dir, "a", "sft", 12)
    b = chat_data(tmp_path, unigram_dir, "b", "sft", 7)
    meta = merge_datasets([a, b], str(tmp_path / "m"))
    assert meta["kind"] == "sft" and meta["documents"] == 19 and meta["chat_template"] == "chatml"
    verify(config(tmp_path, [str(tmp_path / "m")], unigram_dir, vocab=1024), kind="sft")


def test_inspect_missing_prefix_is_one_line(tmp_path, capsys):
    from engine.cli import main

    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nothing'}.bin does not exist (expected PREFIX.bin and PREFIX.idx)"


def test_inspect_resolves_a_relative_tokenizer_path_from_the_sidecar(tmp_path, unigram_dir, monkeypatch):
    from engine.data.inspect_data import inspect_dataset

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copytree(unigram_dir, data_dir / "tok")
    data = pretrain_data(data_dir, data_dir / "tok", "d")
    meta = json.loads(Path(data + ".json").read_text())
    meta["tokenizer"]["path"] = "tok/tokenizer.model"  # as an older preprocess run wrote it
    Path(data + ".json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)  # not the sidecar's directory
    stats = inspect_dataset(data, num_docs=1)
    assert stats["documents_without_final_eod"] == 0 and stats["samples"] and not stats["warnings"]
    shutil.rmtree(data_dir / "tok")
    stats = inspect_dataset(data, num_docs=1)
    assert "documents_without_final_eod" not in stats
    assert stats["warnings"] == [
        f"the sidecar's tokenizer {data_dir / 'tok/tokenizer.model'} does not exist; "
        "the end-of-document check and the decoded samples were skipped (pass --tokenizer)"
    ]


def test_preprocess_records_an_absolute_tokenizer_path(tmp_path, unigram_dir, monkeypatch):
    shutil.copytree(unigram_dir, tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in sample_docs(5)])
    preprocess([str(src)], "tok", str(tmp_path / "d"), progress=False)
    assert json.loads((tmp_path / "d.json").read_text())["tokenizer"]["path"] == str(
        tmp_path / "tok" / "tokenizer.model"
    )


def test_empty_chat_split_with_evaluation_on_is_one_line(tmp_path, unigram_dir):
    from engine.data.builders import build_training_data

    data = chat_data(tmp_path, unigram_dir, "pref", "preference", 12)  # 98,1,1 of 12 pairs: valid holds none
    cfg = config(tmp_path, [data], unigram_dir, vocab=1024, split="98,1,1")
    with pytest.raises(ConfigError) as e:
        build_training_data("preference", cfg, 8, 8)
    assert one_line(e) == f"{data}: the split holds no pairs"
