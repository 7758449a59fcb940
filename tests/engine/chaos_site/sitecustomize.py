"""Test-only instrumentation for the chaos test, loaded through PYTHONPATH by the ranks of
the faulted job: it widens the window in which a checkpoint is being written (a pause after
megatron-core's ``dist_checkpointing.save`` wrote the shards, before the engine writes the
manifest and renames ``iter_N.tmp``), so that a kill can land inside a save on purpose
instead of by luck. Nothing of the engine is changed; the reference run does not load it."""

import os

_DELAY = float(os.environ.get("CHAOS_SAVE_DELAY_S", "0") or 0)

if _DELAY > 0 and "LOCAL_RANK" in os.environ:  # torchrun's workers only, not torchrun itself
    import time

    from megatron.core import dist_checkpointing

    _save = dist_checkpointing.save

    def _slow_save(*args, **kwargs):
        out = _save(*args, **kwargs)
        time.sleep(_DELAY)
        return out

    dist_checkpointing.save = _slow_save
