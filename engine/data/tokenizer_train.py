"""Train a SentencePiece tokenizer and write tokenizer.model / tokenizer.json / meta.

Settings chosen so that text survives a round trip (the seed run lost every newline to
``<unk>``): byte fallback on, ``remove_extra_whitespaces=False`` (space runs kept),
``add_dummy_prefix=False`` (no invented leading space, and an exact HF equivalent),
and an NFKC rule set that leaves newlines, tabs and Hangul compatibility jamo alone.
Special and chat tokens are reserved at training time, not appended afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, TypedDict

from engine.data import readers
from engine.data.tokenizer import (
    DEFAULT_VOCAB_MULTIPLE,
    HF_FILE,
    META_FILE,
    MODEL_FILE,
    padded_vocab_size,
    sha256_bytes,
)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
DEFAULT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
NORMALIZATIONS = ("nfkc-keep-jamo", "nfkc", "identity")
DEFAULT_NORMALIZATION = "nfkc-keep-jamo"
# Unigram piece scores are rounded to multiples of this so that path scores are exact
# in both SentencePiece (float32) and HF tokenizers (float64): otherwise rounding noise
# decides ties such as "==" + "=" against "=" + "==" differently in the two libraries.
UNIGRAM_SCORE_QUANTUM = 1.0 / 16
META_FORMAT_VERSION = 1


class VocabSizeError(ValueError):
    """The corpus cannot support the requested vocabulary size (or the size is too small)."""


def _is_compat_jamo(ch: str) -> bool:
    """Hangul compatibility jamo (ㄱ..ㆎ) and their halfwidth forms."""
    o = ord(ch)
    return 0x3131 <= o <= 0x318E or 0xFFA0 <= o <= 0xFFDC


def write_normalization_rules(name: str, path: Path) -> Optional[Path]:
    """Write the rule TSV for ``name`` to ``path``; None means use a built-in rule name.

    ``nfkc-keep-jamo`` is SentencePiece's own ``nfkc`` table minus the rules that rewrite
    Hangul compatibility jamo: NFKC turns "ㅋㅋ" into conjoining jamo (and "ㅋㅏ" into
    "카"), which changes Korean chat text. Plain ``nfkc`` keeps newlines and tabs too
    (``nmt_nfkc``, SentencePiece's default, maps them to spaces and is not offered).
    """
    if name != "nfkc-keep-jamo":
        return None
    import sentencepiece as spm

    rules = spm.SentencePieceNormalizer(rule_name="nfkc").decompile()
    with open(path, "w", encoding="utf-8") as f:
        for src, dst in rules:
            if any(_is_compat_jamo(c) for c in src):
                continue
            f.write(" ".join(f"{ord(c):X}" for c in src) + "\t" + " ".join(f"{ord(c):X}" for c in dst) + "\n")
    return path


class TrainStats(TypedDict, total=False):
    """What :func:`iter_training_sentences` counted while SentencePiece read it."""

    documents: int
    sentences: int
    skipped: Dict[str, int]  # bad records skipped, by reason


def iter_training_sentences(files: Sequence[Path], json_key: str, stats: TrainStats, text_docs: str) -> Iterator[str]:
    """Yield the non-empty lines of every document (SentencePiece trains on lines).

    Newlines themselves are learned through byte fallback (``<0x0A>``). Bad records are
    skipped and counted: a tokenizer does not need every document.
    """
    skipped: Dict[str, int] = {}
    for text in readers.iter_documents(files, json_key, skip_bad=True, skipped=skipped, text_docs=text_docs):
        stats["documents"] = stats.get("documents", 0) + 1
        for line in text.split("\n"):
            if line.strip():
                stats["sentences"] = stats.get("sentences", 0) + 1
                yield line
    stats["skipped"] = skipped


def _finish_model(model_bytes: bytes, quantize: bool) -> bytes:
    """Make the model reproducible and HF-exact.

    Clears the temporary paths SentencePiece records in the proto (so the content hash
    depends only on data and settings) and, for Unigram, rounds normal pieces' scores to
    :data:`UNIGRAM_SCORE_QUANTUM` (see its comment).
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    # protobuf-generated module: its message classes are created at import time, so mypy cannot see them
    ModelProto = pb.ModelProto  # type: ignore[attr-defined]
    proto = ModelProto()
    proto.ParseFromString(model_bytes)
    proto.trainer_spec.model_prefix = ""
    proto.normalizer_spec.normalization_rule_tsv = ""
    if quantize:
        q = UNIGRAM_SCORE_QUANTUM
        for piece in proto.pieces:
            if piece.type == ModelProto.SentencePiece.NORMAL:
                piece.score = round(piece.score / q) * q
    return proto.SerializeToString(deterministic=True)


def train_tokenizer(
    inputs: Sequence[str],
    output_dir: str,
    vocab_size: int,
    model_type: str = "unigram",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE,
    json_key: str = "text",
    input_sentence_size: int = 0,
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    split_digits: bool = True,
    normalization: str = DEFAULT_NORMALIZATION,
    max_sentence_length: int = 16384,
    seed: int = 1234,
    num_threads: int = 8,
    text_docs: str = readers.TEXT_DOC_LINE,
    allow_smaller_vocab: bool = False,
) -> dict:
    """Train a tokenizer on ``inputs`` (files or globs) and write it to ``output_dir``.

    Returns the metadata written to ``tokenizer_meta.json``. Files are first written to
    a temporary directory and moved into place only when all three exist.

    Inputs without a single non-empty line raise ``InputError``. SentencePiece trains at
    most the pieces the corpus supports; when that is fewer than ``vocab_size`` this raises
    ``VocabSizeError`` naming the reachable size and writes nothing, unless
    ``allow_smaller_vocab`` keeps the smaller tokenizer (``trained_vocab_size`` <
    ``requested_vocab_size`` in the meta; the CLI prints a warning).
    """
    import sentencepiece as spm

    if vocab_size < 1:
        raise VocabSizeError(f"vocab_size must be >= 1, got {vocab_size}")
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be unigram or bpe, got {model_type!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    special_tokens = list(dict.fromkeys(special_tokens))  # de-duplicate, keep order
    clash = set(special_tokens) & {UNK, BOS, EOS, PAD}
    if clash:
        raise ValueError(f"{sorted(clash)} are always reserved; do not list them in --special-tokens")
    files = readers.expand_inputs(inputs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: TrainStats = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out) as tmp_dir:
        tmp = Path(tmp_dir)
        rules = write_normalization_rules(normalization, tmp / "rules.tsv")
        # Any: SentencePieceTrainer.train's stub types every keyword separately.
        options: Dict[str, Any] = dict(
            sentence_iterator=iter_training_sentences(files, json_key, stats, text_docs),
            model_prefix=str(tmp / "sp"),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            split_digits=split_digits,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            user_defined_symbols=special_tokens,
            max_sentence_length=max_sentence_length,
            # Fixed, not os.cpu_count(): SentencePiece's result depends on the thread
            # count, and the same command should give the same tokenizer everywhere.
            num_threads=num_threads,
            # A small corpus may not support the requested size; train what it supports.
            hard_vocab_limit=False,
            minloglevel=2,
        )
        if rules is not None:
            options["normalization_rule_tsv"] = str(rules)
        else:
            options["normalization_rule_name"] = normalization
        if input_sentence_size:
            # Reservoir-sample this many lines; memory stays bounded on large corpora.
            options.update(input_sentence_size=input_sentence_size, shuffle_input_sentence=True)
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(**options)
        except RuntimeError as exc:
            if not stats.get("sentences"):
                raise readers.InputError(
                    f"no text to train on: {len(files)} input file(s), {stats.get('documents', 0)} document(s), "
                    f"no non-empty line ({', '.join(str(f) for f in files[:3])})"
                ) from None
            # SentencePiece's own words after its source location, e.g. "Vocabulary size is
            # smaller than required_chars. 10 vs 718."
            raise VocabSizeError(f"SentencePiece refused the settings: {str(exc).split('] ', 1)[-1].strip()}") from None

        model_bytes = _finish_model((tmp / "sp.model").read_bytes(), quantize=model_type == "unigram")
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        from engine.data.tokenizer_hf import write_hf_tokenizer

        write_hf_tokenizer(model_bytes, tmp / HF_FILE)
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        trained = sp.get_piece_size()
        # hard_vocab_limit=False lets SentencePiece stop at what the corpus supports; asking
        # for that size again gives exactly it, so the error can name it.
        if trained < vocab_size and not allow_smaller_vocab:
            raise VocabSizeError(
                f"the input supports only {trained} pieces, {vocab_size} were asked (model_type {model_type}): "
                f"pass --vocab-size {trained} (or less), give more text, or --allow-smaller-vocab to keep "
                f"{trained}; nothing written"
            )
        padded = padded_vocab_size(trained, vocab_multiple)
        meta = {
            "format_version": META_FORMAT_VERSION,
            "sha256": sha256_bytes(model_bytes),
            "model_type": model_type,
            "vocab_size": padded,
            "trained_vocab_size": trained,
            "requested_vocab_size": vocab_size,
            "vocab_multiple": vocab_multiple,
            "vocab_padding": {
                "count": padded - trained,
                "first_id": trained,
                "end_id": padded,
                "note": "rows for alignment only; the tokenizer never emits them",
            },
            "special_tokens": {
                "unk": [UNK, 0],
                "bos": [BOS, 1],
                "eos": [EOS, 2],
                "pad": [PAD, 3],
                "user_defined": {t: sp.piece_to_id(t) for t in special_tokens},
            },
            "byte_fallback": byte_fallback,
            "character_coverage": character_coverage,
            "normalization": normalization,
            "add_dummy_prefix": False,
            "remove_extra_whitespaces": False,
            "split_digits": split_digits,
            "input_sentence_size": input_sentence_size,
            "max_sentence_length": max_sentence_length,
            "unigram_score_quantum": UNIGRAM_SCORE_QUANTUM if model_type == "unigram" else None,
            "seed": seed,
            "num_threads": num_threads,
            "json_key": json_key,
            "inputs": [str(f) for f in files],
            "training_documents": stats.get("documents", 0),
            "training_sentences": stats.get("sentences", 0),
            "skipped_records": stats.get("skipped", {}),
            "train_seconds": round(time.time() - started, 2),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in (MODEL_FILE, HF_FILE, META_FILE):
            os.replace(tmp / name, out / name)
    return meta
