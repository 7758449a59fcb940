"""Build a Hugging Face ``tokenizer.json`` that tokenizes exactly like a SentencePiece model.

Built directly with the ``tokenizers`` library from the SentencePiece model proto:

- normalizer: the model's own precompiled character map (so NFKC or any custom rule
  set is reproduced byte for byte), then spaces -> ``▁``. The engine trains with
  ``add_dummy_prefix=False`` and ``remove_extra_whitespaces=False``, so nothing else
  is needed; models with other settings are refused rather than converted approximately.
- model: Unigram (pieces and scores) or BPE (merges derived from the vocabulary,
  ranked by the score of the merged piece, as SentencePiece ranks them), byte fallback on.
- user-defined pieces (chat tokens) become added tokens, matched before the model
  runs, as SentencePiece matches them.

Known difference: control pieces (``<s>``, ``</s>``, ``<pad>``) and byte pieces are
plain vocabulary entries here, so a document that literally contains the text ``<s>``
may tokenize differently (SentencePiece never matches control pieces in text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

if TYPE_CHECKING:
    from engine.data.tokenizer import Tokenizer

# sentencepiece_model.proto ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2


def _model_proto(model_bytes: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    # protobuf-generated module: its message classes are created at import time, so mypy cannot see them
    proto = pb.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(model_bytes)
    return proto


def _bpe_merges(pieces: List[Tuple[str, float, int]]) -> List[Tuple[str, str]]:
    """Merges for every normal piece that splits into two vocabulary pieces.

    SentencePiece BPE merges the adjacent pair whose concatenation has the best score;
    ranking merges by (score of the result, then the parts' ids) reproduces that order.
    """
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-score, i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(model_bytes: bytes):
    """Return a ``tokenizers.Tokenizer`` equivalent to the SentencePiece model."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("writing tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from exc

    proto = _model_proto(model_bytes)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise ValueError(
            "tokenizer.json export supports models trained with add_dummy_prefix=False, "
            "remove_extra_whitespaces=False, escape_whitespaces=True (the engine's settings)"
        )
    if trainer.treat_whitespace_as_suffix:
        raise ValueError("tokenizer.json export does not support treat_whitespace_as_suffix")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    byte_fallback = bool(trainer.byte_fallback)
    unk_piece = pieces[trainer.unk_id][0]

    model: models.Model
    if trainer.model_type == UNIGRAM:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=trainer.unk_id, byte_fallback=byte_fallback)
    elif trainer.model_type == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces),
            unk_token=unk_piece,
            byte_fallback=byte_fallback,
            fuse_unk=True,
        )
    else:
        raise ValueError(f"unsupported SentencePiece model type {trainer.model_type}")

    tok = Tokenizer(model)
    steps: List[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:  # empty for the identity rule
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    user_defined = [p for p, _, kind in pieces if kind == USER_DEFINED]
    if user_defined:
        tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in user_defined])
    return tok


def write_hf_tokenizer(model_bytes: bytes, path: Union[str, os.PathLike]) -> None:
    """Write the ``tokenizer.json`` equivalent of the SentencePiece model to ``path``."""
    build_hf_tokenizer(model_bytes).save(str(path))


def _piece(tok: "Tokenizer", i: int) -> Optional[str]:
    return tok.processor.id_to_piece(i) if i >= 0 else None


def write_tokenizer(tok: "Tokenizer", chat_template: str, out: Path, max_length: int) -> None:
    """``tokenizer.json`` (built from the SentencePiece model), ``tokenizer.model``,
    ``tokenizer_config.json`` (class, special tokens, chat template) and
    ``special_tokens_map.json``, in the keys transformers 4.x and 5.x both read."""
    from transformers import PreTrainedTokenizerFast

    # The user-defined pieces (chat markers) are added special tokens in tokenizer.json.
    extra = [t.content for t in build_hf_tokenizer(tok.model_bytes).get_added_tokens_decoder().values()]
    special = {
        "bos_token": _piece(tok, tok.bos),
        "eos_token": _piece(tok, tok.eod),
        "unk_token": _piece(tok, tok.unk),
        "pad_token": _piece(tok, tok.pad),
    }
    special = {k: v for k, v in special.items() if v is not None}
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_tokenizer(tok.model_bytes),
        chat_template=chat_template,
        model_max_length=max_length,
        **special,
    )
    hf_tok.save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(tok.model_bytes)
    # transformers 5 writes its own class name (TokenizersBackend) and a list-valued
    # ``extra_special_tokens`` that 4.x cannot read; 4.x and the tools built on it (vLLM,
    # TRL, llama.cpp's converter) read these keys, and 5.x reads them too.
    cfg_file = out / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc.pop("extra_special_tokens", None)
    tc.pop("backend", None)
    tc.update(
        tokenizer_class="PreTrainedTokenizerFast",
        additional_special_tokens=extra,
        chat_template=chat_template,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **special,
    )
    cfg_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(dict(special, additional_special_tokens=extra), indent=2, ensure_ascii=False) + "\n"
    )
