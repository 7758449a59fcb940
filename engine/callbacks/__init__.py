"""Training-loop callbacks: one small class per service around the step (see :mod:`.base`
for the hooks and their order).

``build_callbacks(cfg)`` lists the built-in ones in the order that keeps the run's
observable order of events: within a step, the log line, then validation, then the
checkpoint at ``checkpoint.save_interval``; a stop asked for in ``on_step_end`` (signals)
is acted on after every callback's ``on_step_end``; the final checkpoint comes before any
``on_train_end``. The throughput timer starts after the profiler window opens, so opening
it is not counted in the step time.
"""

from __future__ import annotations

from typing import List, Sequence

from engine.callbacks.base import Callback
from engine.callbacks.checkpointing import CheckpointCallback
from engine.callbacks.evaluation import EvaluationCallback
from engine.callbacks.loggers import ConsoleLogger, MetricsFileLogger
from engine.callbacks.throughput import SourceShareCallback, ThroughputCallback
from engine.config import Config

__all__ = [
    "Callback",
    "CheckpointCallback",
    "ConsoleLogger",
    "EvaluationCallback",
    "MetricsFileLogger",
    "SourceShareCallback",
    "ThroughputCallback",
    "build_callbacks",
]


def build_callbacks(cfg: Config, extra: Sequence[Callback] = ()) -> List[Callback]:
    """The built-in callbacks for ``cfg``, in hook order, then ``extra`` (a user's own)."""
    from engine.preemption import PreemptionHandler
    from engine.profiling import profiling_callbacks

    callbacks: List[Callback] = [
        EvaluationCallback(cfg.training.eval_interval, cfg.training.eval_at_start),  # on_step_end: after the log line
        PreemptionHandler(cfg.preemption.signals, cfg.preemption.exit_code),  # on_step_end: asks to stop
        *profiling_callbacks(cfg),  # on_step_start before the throughput timer starts
        ThroughputCallback(cfg.logging.gpu),  # record_metrics: step time, tok/s, MFU, memory
        SourceShareCallback(),  # record_metrics: realised blend shares
        MetricsFileLogger(cfg),  # log_metrics: metrics.jsonl, TensorBoard, wandb (rank 0)
        ConsoleLogger(cfg.logging.interval),  # log_metrics: the log line, the validation line
        CheckpointCallback(cfg.checkpoint.save_interval),  # on_step_end last; pre_train_end: final save
    ]
    callbacks.extend(extra)
    return callbacks
