"""Things that happen around training steps without being part of one (profiling windows,
signal handling, ...). The loop calls every callback at fixed points; a callback may ask
the loop to stop after the current step with ``trainer.request_stop``."""
from __future__ import annotations

from typing import Dict, List


class Callback:
    """Base class: every hook is a no-op."""

    def on_train_start(self, trainer) -> None:
        """Before the first step (after checkpoint loading and data building)."""

    def on_step_start(self, trainer, step: int) -> None:
        """Before optimizer step ``step`` (1-based) begins."""

    def on_step_end(self, trainer, step: int, metrics: Dict[str, float]) -> None:
        """After step ``step`` finished and its metrics were logged."""

    def on_train_end(self, trainer) -> None:
        """After the last step and the final checkpoint (also on a requested stop)."""

    def on_exception(self, trainer, exc: BaseException) -> None:
        """A training step raised ``exc`` (e.g. out of memory); the loop re-raises it afterwards."""


def build_callbacks(cfg) -> List[Callback]:
    """The callbacks the config asks for: signal handling (always), profiling (``profile.*``)."""
    from engine.preemption import PreemptionHandler
    from engine.profiling import profiling_callbacks

    callbacks: List[Callback] = [PreemptionHandler(cfg.preemption.signals, cfg.preemption.exit_code)]
    callbacks.extend(profiling_callbacks(cfg))
    return callbacks
