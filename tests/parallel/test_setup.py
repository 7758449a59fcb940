"""parallel/setup.py: building a layout again in the same process frees the previous one."""

from __future__ import annotations

from pathlib import Path

from engine.config import ParallelConfig


def _gloo_threads() -> int:
    """Threads of this process whose name says gloo (its transport loops), from /proc."""
    return sum("gloo" in (task / "comm").read_text() for task in Path("/proc/self/task").iterdir())


def test_rebuilding_the_layout_does_not_accumulate_groups(megatron_single_rank):
    """megatron-core's destroy_model_parallel only forgets its groups; each layout built
    again used to leave ~20 gloo groups and ~60 transport threads behind, which slowed a long
    test process (and any command loading several checkpoints) to a crawl."""
    from parallel.setup import init_model_parallel

    init_model_parallel(ParallelConfig(), seed=0)
    before = _gloo_threads()
    for _ in range(3):
        init_model_parallel(ParallelConfig(), seed=0)
    assert before > 0
    assert _gloo_threads() == before
