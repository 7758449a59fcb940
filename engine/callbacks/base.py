"""The hooks a training-loop callback can implement (all no-ops here).

``Trainer.fit`` is the step, the counters and these hooks; everything else around a step
(throughput, logging, evaluation, checkpoint cadence, signals, profiling) is a callback.
The trainer calls each hook on every callback in list order (``Trainer.callbacks``):

* ``on_train_start`` once, after checkpoint loading and data building;
* per step: ``on_step_start`` -> ``pre_optim_step`` (gradients ready, update not applied)
  -> ``record_metrics`` (add figures to the step's flat metrics dict) -> ``log_metrics``
  (sinks: read, do not change) -> ``on_step_end``; then the loop stops if a callback asked
  for it with ``trainer.request_stop``;
* ``pre_train_end`` (the final checkpoint is written here) then ``on_train_end``, at the end
  of the run and on a requested stop;
* ``on_error`` when the run raises (the exception is re-raised afterwards).

``log_metrics`` is also called for validation metrics (``split="valid"``), by the evaluation
callback through ``trainer.log_metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Mapping, Optional

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer


class Callback:
    """Base class: every hook is a no-op; subclasses override the ones they need."""

    def on_train_start(self, trainer: "Trainer") -> None:
        """Before the first step (after checkpoint loading and data building)."""

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        """Before optimizer step ``step`` (1-based) begins."""

    def pre_optim_step(self, trainer: "Trainer", step: int, metrics: Dict[str, float]) -> None:
        """After the forward-backward pass of ``step``, before the optimizer step: gradients
        are reduced and ``metrics`` holds the objective's metrics (loss, ...) of the batch."""

    def record_metrics(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        """Add this callback's figures (e.g. throughput) to the step's flat ``metrics`` dict,
        which already holds the objective's metrics, ``grad_norm``, ``lr`` and the counters."""

    def log_metrics(
        self, trainer: "Trainer", step: int, metrics: Mapping[str, Optional[float]], split: str = "train"
    ) -> None:
        """Record ``metrics`` of ``step`` (``split`` "train" once per step, "valid" after each
        evaluation); every figure is already in the dict: sinks read it, never change it."""

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        """After step ``step`` finished and its metrics were logged; may call ``trainer.request_stop``."""

    def pre_train_end(self, trainer: "Trainer") -> None:
        """The run ends (last step done, or a requested stop): the final checkpoint is written here."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """After the final checkpoint (also on a requested stop): release what the callback holds."""

    def on_error(self, trainer: "Trainer", exc: BaseException) -> None:
        """The run raised ``exc`` (a step, e.g. out of memory, a hook or a checkpoint); the loop
        re-raises it afterwards. Not called for a requested stop."""
