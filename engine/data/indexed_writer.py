"""Write one megatron-core ``.bin/.idx`` pair plus its ``.json`` sidecar, atomically.

Data goes to ``PREFIX.bin.partial`` / ``PREFIX.idx.partial`` through megatron-core's
``IndexedDatasetBuilder`` (so the format is megatron's own). :meth:`commit` renames
them to their final names, the sidecar last: a run that dies at any point leaves only
``*.partial`` files, never a ``.bin/.idx`` that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Type

import numpy

PARTIAL = ".partial"
SIDECAR_FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> Type[numpy.number]:
    """Token dtype for a vocabulary: megatron-core's rule (uint16 below 65500, else int32).

    A padded vocabulary of 65536 therefore gets int32, as megatron-core's own
    preprocessing would choose.
    """
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def output_paths(prefix: str) -> dict:
    """Final paths of the files a dataset prefix consists of."""
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "json": prefix + ".json"}


class IndexedWriter:
    """Accumulate documents for one output prefix; nothing final exists until commit()."""

    def __init__(self, prefix: str, dtype: Type[numpy.number]) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = dtype
        self.paths = output_paths(prefix)
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self._builder = IndexedDatasetBuilder(self.paths["bin"] + PARTIAL, dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1  # recorded in the sidecar: `train` checks it against the model's vocabulary
        self._finalized = False

    def add_document(self, tokens: numpy.ndarray) -> None:
        """Append one document (its tokens, EOS included) as one sequence."""
        self._builder.add_document(tokens, [int(tokens.size)])
        self.documents += 1
        self.tokens += int(tokens.size)
        self.note_max(tokens)

    def note_max(self, tokens: numpy.ndarray) -> None:
        """Fold ``tokens`` (just written) into :attr:`max_token_id`."""
        if tokens.size:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def add_dataset(self, prefix: str) -> None:
        """Append a whole existing dataset (megatron-core concatenates index and data)."""
        self._builder.add_index(prefix)

    def finalize(self) -> None:
        """Close the data file and write the partial index."""
        self._builder.finalize(self.paths["idx"] + PARTIAL)
        self._finalized = True

    def commit(self, sidecar: dict) -> None:
        """Write the sidecar and move bin, idx, then json to their final names."""
        if not self._finalized:
            self.finalize()
        tmp_json = self.paths["json"] + PARTIAL
        with open(tmp_json, "w", encoding="utf-8") as f:
            json.dump(sidecar, f, indent=2, ensure_ascii=False)
            f.write("\n")
        for kind in ("bin", "idx", "json"):
            os.replace(self.paths[kind] + PARTIAL, self.paths[kind])

    def abort(self) -> None:
        """Close and delete the partial files (safe to call more than once)."""
        try:
            self._builder.data_file.close()
        except Exception:  # already closed
            pass
        for kind in ("bin", "idx", "json"):
            try:
                os.remove(self.paths[kind] + PARTIAL)
            except FileNotFoundError:
                pass


def read_sidecar(prefix: str) -> Optional[dict]:
    """The sidecar of ``prefix``, or None when there is none."""
    path = output_paths(prefix)["json"]
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
