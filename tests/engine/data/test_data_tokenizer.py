"""Tokenizer training, loading, HF parity and lint."""

from __future__ import annotations

import json
import random

import pytest
from data_test_helpers import MIXED_TEXTS, SAMPLE, sample_docs

from engine.data.tokenizer import TokenizerError, load_tokenizer
from engine.data.tokenizer_lint import PROBES, lint_tokenizer
from engine.data.tokenizer_train import train_tokenizer


def random_unicode(rng: random.Random, length: int) -> str:
    """Random text drawn from every plane (no surrogates), plus common whitespace."""
    out = []
    for _ in range(length):
        r = rng.random()
        if r < 0.1:
            out.append(rng.choice(["\n", "\t", " ", "  ", "\r\n"]))
        elif r < 0.4:
            out.append(chr(rng.randint(0xAC00, 0xD7A3)))  # Hangul syllables
        elif r < 0.6:
            out.append(chr(rng.randint(0x1F300, 0x1FAFF)))  # emoji
        else:
            cp = rng.randint(0x20, 0x10FFFF)
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randint(0x20, 0x10FFFF)
            out.append(chr(cp))
    return "".join(out)


def test_files_and_padded_vocab(unigram_dir):
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_meta.json"):
        assert (unigram_dir / name).is_file()
    meta = json.loads((unigram_dir / "tokenizer_meta.json").read_text())
    tok = load_tokenizer(unigram_dir)
    assert tok.trained_vocab_size == meta["trained_vocab_size"] == 1000
    assert tok.vocab_size == meta["vocab_size"] == 1024  # padded to a multiple of 128
    assert meta["vocab_padding"]["count"] == 24
    assert tok.sha256 == meta["sha256"]
    assert meta["byte_fallback"] is True and meta["character_coverage"] == 0.9995
    # Loading the .model file directly finds the sidecar next to it.
    assert load_tokenizer(unigram_dir / "tokenizer.model").vocab_size == 1024


def test_special_tokens_are_single_pieces(unigram_dir):
    tok = load_tokenizer(unigram_dir)
    assert (tok.unk, tok.bos, tok.eod, tok.pad) == (0, 1, 2, 3)
    assert tok.token_to_id("</s>") == tok.eod and tok.token_to_id("<pad>") == tok.pad
    for piece in ("<|im_start|>", "<|im_end|>"):
        i = tok.token_to_id(piece)
        assert i is not None
        assert tok.encode(piece) == [i]
        ids = tok.encode(f"안녕{piece}hello")
        assert i in ids and tok.decode(ids) == f"안녕{piece}hello"
    assert tok.token_to_id("<|not_a_token|>") is None


def test_byte_fallback_round_trips_arbitrary_unicode(tmp_path):
    # Identity normalization: then every string must come back exactly.
    train_tokenizer([str(SAMPLE)], str(tmp_path), vocab_size=1000, normalization="identity")
    tok = load_tokenizer(tmp_path)
    rng = random.Random(0)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(1, 60))
        ids = tok.encode(text)
        assert tok.unk not in ids
        assert tok.decode(ids) == text


def test_default_normalization_keeps_whitespace_jamo_and_emoji(unigram_dir):
    tok = load_tokenizer(unigram_dir)
    rng = random.Random(1)
    for _ in range(100):
        text = random_unicode(rng, rng.randint(1, 60))
        ids = tok.encode(text)
        assert tok.unk not in ids
        # Up to NFKC, nothing is lost.
        assert tok.decode(ids) == tok.processor.normalize(text).replace("\u2581", " ")
    for text in ["a\nb\tc  d   e", "ㅋㅋㅋ ㅠㅠ ㄱㄴㄷ", "😀👍🏽 👨‍👩‍👧 🇰🇷", "  x  "]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("①　ＡＢ")) == "1 AB"  # NFKC is applied


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_hf_tokenizer_json_matches_sentencepiece(kind, unigram_dir, bpe_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    d = unigram_dir if kind == "unigram" else bpe_dir
    tok = load_tokenizer(d)
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    texts = MIXED_TEXTS + sample_docs(120)
    for text in texts:
        expected = tok.encode(text)
        assert hf.encode(text).ids == expected, text[:80]
        assert fast.encode(text, add_special_tokens=False) == expected, text[:80]
        assert hf.decode(expected, skip_special_tokens=False) == tok.decode(expected)


def test_training_is_deterministic(tmp_path, unigram_dir):
    train_tokenizer([str(SAMPLE)], str(tmp_path), vocab_size=1000)
    assert load_tokenizer(tmp_path).sha256 == load_tokenizer(unigram_dir).sha256


def test_stale_sidecar_is_refused(tmp_path, unigram_dir):
    (tmp_path / "tokenizer.model").write_bytes((unigram_dir / "tokenizer.model").read_bytes())
    meta = json.loads((unigram_dir / "tokenizer_meta.json").read_text())
    meta["sha256"] = "0" * 64
    (tmp_path / "tokenizer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="sha256"):
        load_tokenizer(tmp_path)


def test_pickle_round_trip(unigram_dir):
    import pickle

    tok = load_tokenizer(unigram_dir)
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode(MIXED_TEXTS[0]) == tok.encode(MIXED_TEXTS[0])
    assert (tok2.vocab_size, tok2.eod, tok2.pad, tok2.sha256) == (tok.vocab_size, tok.eod, tok.pad, tok.sha256)


def test_lint_passes_for_default_tokenizer(unigram_dir):
    report = lint_tokenizer(load_tokenizer(unigram_dir), sample_docs())
    assert report["ok"], report["failures"]
    assert all(p["exact"] for p in report["probes"].values()), report["probes"]
    assert report["sample"]["unk_tokens"] == 0
    assert report["sample"]["round_trip_up_to_normalization"] == "296/296"
    # The constitution's circled numbers are changed by NFKC and the report says so.
    assert "①->1" in report["sample"]["normalization_changes"]
    assert 0 < report["sample"]["tokens_per_char"] < 2


def test_lint_fails_without_byte_fallback(tmp_path):
    from engine.cli import main

    out = tmp_path / "tok"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(SAMPLE),
            "--output-dir",
            str(out),
            "--vocab-size",
            "1000",
            "--no-byte-fallback",
        ]
    )
    assert rc == 1  # training ran, but its automatic lint failed
    report = lint_tokenizer(load_tokenizer(out), sample_docs(50))
    assert not report["ok"]
    assert not report["probes"]["newline"]["up_to_normalization"]
    assert report["probes"]["emoji"]["unk"] > 0
    assert main(["tokenizer", "check", "--tokenizer", str(out), "--input", str(SAMPLE)]) == 1


def test_cli_check_passes(unigram_dir, capsys):
    from engine.cli import main

    assert main(["tokenizer", "check", "--tokenizer", str(unigram_dir)]) == 0
    out = capsys.readouterr().out
    for name in PROBES:
        assert name in out
    assert "OK" in out


def test_cli_train_on_empty_input_is_one_line_error(tmp_path, capsys):
    from engine.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    for path in (empty, blank):
        assert (
            main(
                [
                    "tokenizer",
                    "train",
                    "--input",
                    str(path),
                    "--output-dir",
                    str(tmp_path / "tok"),
                    "--vocab-size",
                    "1000",
                ]
            )
            == 1
        )
        err = capsys.readouterr().err
        assert err.startswith("error: no text to train on") and err.count("\n") == 1, err
    assert not (tmp_path / "tok" / "tokenizer.model").exists()


def test_cli_train_names_the_reachable_vocab_size(tmp_path, capsys):
    import re

    from engine.cli import main

    small = tmp_path / "small.txt"
    small.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(40)))
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--input", str(small), "--output-dir", str(out), "--model-type", "bpe"]
    assert main([*args, "--vocab-size", "100000"]) == 1
    err = capsys.readouterr().err
    found = re.search(r"the input supports only (\d+) pieces, 100000 were asked", err)
    assert found and err.count("\n") == 1, err
    assert not (out / "tokenizer.model").exists()  # nothing written
    reachable = int(found.group(1))
    # The size named is one the corpus really reaches.
    main([*args, "--vocab-size", str(reachable)])
    assert load_tokenizer(out).trained_vocab_size == reachable
    capsys.readouterr()
    # Keeping the smaller tokenizer is possible, but loud.
    main([*args, "--vocab-size", "100000", "--allow-smaller-vocab"])
    err = capsys.readouterr().err
    assert f"WARNING: the input supports only {reachable} pieces" in err
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert (meta["trained_vocab_size"], meta["requested_vocab_size"]) == (reachable, 100000)


def test_cli_train_rejects_nonpositive_vocab_size(tmp_path, capsys):
    from engine.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["tokenizer", "train", "--input", str(SAMPLE), "--output-dir", str(tmp_path), "--vocab-size", "0"])
    assert exit_.value.code == 2 and "argument --vocab-size: must be >= 1, got 0" in capsys.readouterr().err
