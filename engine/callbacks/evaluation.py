"""Validation at a step cadence."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from engine.callbacks.base import Callback

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer


class EvaluationCallback(Callback):
    """Every ``interval`` steps and at the last step (never when ``interval`` is 0): the
    trainer's ``evaluate()`` over the validation data, logged as split ``"valid"``."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        if not self.interval or not (step % self.interval == 0 or step == trainer.cfg.training.steps):
            return
        trainer.log_metrics(step, trainer.evaluate(), split="valid")
