"""Validation at a step cadence."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

from engine.callbacks.base import Callback

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer


class EvaluationCallback(Callback):
    """Every ``interval`` steps and at the last step (never when ``interval`` is 0): the
    trainer's ``evaluate()`` over the validation data, logged as split ``"valid"``. With
    ``at_start``, also once before the first step of a fresh run, logged as step 0."""

    def __init__(self, interval: int, at_start: bool = False):
        self.interval = interval
        self.at_start = at_start

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        # Here rather than in on_train_start: the metrics writer opens there, after this
        # callback; step 1 starts only in a fresh run, so a resume never repeats the baseline.
        if self.interval and self.at_start and step == 1:
            trainer.log_metrics(0, trainer.evaluate(), split="valid")

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        if not self.interval or not (step % self.interval == 0 or step == trainer.cfg.training.steps):
            return
        trainer.log_metrics(step, trainer.evaluate(), split="valid")
