"""What the plain-text and the chat preprocessors share: their error and the tool version
their sidecars record (its own module, so neither preprocessor imports the other's)."""

from __future__ import annotations

from engine import __version__


class PreprocessError(RuntimeError):
    """The run stopped; no final output was written."""


def tool_version() -> str:
    """The engine version recorded in sidecars."""
    return f"engine.data.preprocess {__version__}"
