"""The model-building fixture of tests/models (in-memory megatron-core models, no checkpoint)."""

from tests.models.conftest import build_megatron  # noqa: F401  (a fixture: pytest finds it here)
