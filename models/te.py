"""Whether TransformerEngine can be used here: a light check (no torch, no megatron-core
import), so config-only commands such as ``engine config`` and ``engine plan`` stay fast."""

from __future__ import annotations

import importlib.util


def transformer_engine_available() -> bool:
    """True when ``transformer_engine`` (and its torch extension) can be imported."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install (wrong CUDA, ...) counts as absent
        return False
    return True
