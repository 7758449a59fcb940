"""`python -m engine export FORMAT ...`: one sub-command per output format.

Each format module in ``FORMAT_MODULES`` exposes ``register(subparsers)`` like the command
modules do; it must import torch and transformers only inside its command function, because
``python -m engine --help`` imports every module listed here.
"""

from __future__ import annotations

import importlib

FORMAT_MODULES = ["engine.export.hf", "engine.export.gguf"]


def register(subparsers) -> None:
    """Add ``export`` with one sub-command per format module."""
    p = subparsers.add_parser("export", help="write a checkpoint as Hugging Face or GGUF files")
    formats = p.add_subparsers(dest="format", metavar="FORMAT")
    formats.required = True
    for name in FORMAT_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a format not written yet
            if exc.name == name:
                continue
            raise
        module.register(formats)
