"""The engine's tokenizer: a SentencePiece model plus its metadata sidecar.

A trained tokenizer directory holds ``tokenizer.model`` (SentencePiece),
``tokenizer.json`` (the same tokenizer for Hugging Face ``tokenizers``) and
``tokenizer_meta.json`` (training settings, padded vocabulary size, content hash).
:func:`load_tokenizer` returns a :class:`Tokenizer` that megatron-core's ``GPTDataset``
can use directly (it reads ``eod``, ``pad`` and ``vocab_size``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Union

from engine.config import ConfigError

if TYPE_CHECKING:
    from engine.config import Config

MODEL_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
DEFAULT_VOCAB_MULTIPLE = 128


class TokenizerError(ValueError):
    """A tokenizer file is missing, inconsistent with its sidecar, or unusable."""


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (the tokenizer's content hash is that of its .model bytes)."""
    return hashlib.sha256(data).hexdigest()


def padded_vocab_size(size: int, multiple: int) -> int:
    """Round ``size`` up to a multiple of ``multiple``.

    Padding keeps tensor-parallel embedding shards equal and FP8 GEMM dimensions
    aligned; the extra rows are never produced by the tokenizer.
    """
    if multiple < 1:
        raise ValueError(f"vocab multiple must be >= 1, got {multiple}")
    return -(-size // multiple) * multiple


def resolve_tokenizer_paths(path: Union[str, os.PathLike]) -> tuple[Path, Optional[Path]]:
    """Return (model file, metadata file or None) for a directory or a ``.model`` path."""
    path = Path(path)
    if path.is_dir():
        model = path / MODEL_FILE
    else:
        model = path
    if not model.is_file():
        raise TokenizerError(f"no SentencePiece model at {model}")
    meta = model.parent / META_FILE
    return model, (meta if meta.is_file() else None)


class Tokenizer:
    """SentencePiece tokenizer with the attributes megatron-core datasets expect.

    ``vocab_size`` is the PADDED size (what the embedding table must have);
    ``trained_vocab_size`` is the number of real pieces. ``eod`` is the end-of-document
    id appended once per document by preprocessing.
    """

    # The model file it was loaded from; set by ``from_path`` only (None for bytes or an unpickled copy).
    path: Optional[Path] = None

    def __init__(self, model_bytes: bytes, meta: Optional[dict] = None) -> None:
        import sentencepiece as spm

        self._model_bytes = model_bytes
        self.meta = dict(meta or {})
        self.sha256 = sha256_bytes(model_bytes)
        if self.meta.get("sha256") not in (None, self.sha256):
            # A sidecar from another training run would silently give a wrong vocab size.
            raise TokenizerError(
                f"{META_FILE} describes a model with sha256 {self.meta['sha256']}, "
                f"but tokenizer.model has sha256 {self.sha256}"
            )
        # num_threads=1: callers parallelise across processes; SentencePiece's own
        # thread pool would oversubscribe the cores.
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes, num_threads=1)
        self.trained_vocab_size = self._sp.get_piece_size()
        multiple = int(self.meta.get("vocab_multiple", DEFAULT_VOCAB_MULTIPLE))
        self.vocab_size = int(self.meta.get("vocab_size", padded_vocab_size(self.trained_vocab_size, multiple)))
        if self.vocab_size < self.trained_vocab_size:
            raise TokenizerError(f"padded vocab_size {self.vocab_size} < trained pieces {self.trained_vocab_size}")
        self.unk = self._sp.unk_id()
        self.bos = self._sp.bos_id()
        self.eod = self._sp.eos_id()
        # -1 when the model has no pad piece: megatron-core then uses its own sentinel.
        self.pad = self._sp.pad_id()
        if self.eod < 0:
            raise TokenizerError("the SentencePiece model has no EOS piece; preprocessing needs one")

    # --- construction -----------------------------------------------------------------
    @classmethod
    def from_path(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load from a directory holding tokenizer.model or from the .model file itself."""
        model, meta_path = resolve_tokenizer_paths(path)
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path else None
        tok = cls(model.read_bytes(), meta)
        tok.path = model
        return tok

    # Pickle the model bytes, not the C++ processor: datasets and worker processes
    # need to ship the tokenizer to other processes or machines.
    def __getstate__(self) -> dict:
        return {"model_bytes": self._model_bytes, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, state["model_bytes"], state["meta"])

    # --- the interface ----------------------------------------------------------------
    @property
    def eos(self) -> int:
        """Alias of ``eod`` (megatron-core checks both names for pad collisions)."""
        return self.eod

    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model."""
        return self._model_bytes

    @property
    def processor(self):
        """The underlying ``sentencepiece.SentencePieceProcessor``."""
        return self._sp

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text; one C++ call for the whole batch."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ids of padding rows (>= trained size) are dropped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.trained_vocab_size]
        return self._sp.decode(ids)

    def token_to_id(self, piece: str) -> Optional[int]:
        """Id of ``piece``, or None when it is not in the vocabulary."""
        i = self._sp.piece_to_id(piece)
        if i == self.unk and piece != self._sp.id_to_piece(self.unk):
            return None
        return i

    def is_byte_fallback(self) -> bool:
        """True when the model has byte pieces (<0x00>..<0xFF>) for unknown characters."""
        return self._sp.is_byte(self._sp.piece_to_id("<0x0A>"))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, trained={self.trained_vocab_size}, "
            f"eod={self.eod}, pad={self.pad}, sha256={self.sha256[:12]})"
        )


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Load the tokenizer at ``path`` (a directory with tokenizer.model, or the .model file)."""
    return Tokenizer.from_path(path)


def load_checkpoint_tokenizer(cfg: "Config") -> Optional["Tokenizer"]:
    """The checkpoint's tokenizer (``data.tokenizer``), checked against ``model.vocab_size``:
    that must be the tokenizer's piece count or its padded size. None when the run had none."""
    if not cfg.data.tokenizer:
        return None
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except (TokenizerError, OSError) as exc:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer}: {exc}") from None
    if cfg.model.vocab_size not in (tok.trained_vocab_size, tok.vocab_size):
        raise ConfigError(
            f"tokenizer {cfg.data.tokenizer} has {tok.trained_vocab_size} pieces (padded {tok.vocab_size}) but "
            f"model.vocab_size is {cfg.model.vocab_size}: the checkpoint was not trained with this tokenizer"
        )
    return tok
