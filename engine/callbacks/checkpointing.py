"""Checkpoint cadence: every ``checkpoint.save_interval`` steps and at the end of the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from engine.callbacks.base import Callback

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer


class CheckpointCallback(Callback):
    """``trainer.save()`` after every ``interval``-th step (0: none) and in ``pre_train_end``
    (the final checkpoint, also on a requested stop). The last step and a step after which
    the run stops are saved once, by the final save."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        if not self.interval or step % self.interval or step == trainer.cfg.training.steps:
            return
        if trainer.stop_requested:
            return  # the stop's final save writes this very step
        trainer.save()

    def pre_train_end(self, trainer: "Trainer") -> None:
        trainer.save()
