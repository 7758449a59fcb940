"""Where step metrics go: the console log line and the metric files (JSONL, TensorBoard, wandb)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from engine.callbacks.base import Callback
from engine.config import Config
from engine.metrics import MetricsWriter, format_line, print_rank0

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer


class ConsoleLogger(Callback):
    """The log line on rank 0 every ``interval`` steps, at step 1 and at the last step (with the
    objective's ``log_keys`` and the blend shares), and a line per validation."""

    def __init__(self, interval: int):
        self.interval = interval

    def log_metrics(
        self, trainer: "Trainer", step: int, metrics: Mapping[str, Optional[float]], split: str = "train"
    ) -> None:
        log_keys = tuple(trainer.objective.log_keys)
        if split == "valid":
            shown = ["loss"] + [k for k in ("ppl",) + log_keys if k in metrics]
            print_rank0(f"validation at step {step}: " + " | ".join(f"{k} {metrics[k]:.4f}" for k in shown))
            return
        total = trainer.cfg.training.steps
        if not (step % self.interval == 0 or step == 1 or step == total):
            return
        line = format_line(step, total, metrics)
        line += "".join(f" | {k} {metrics[k]:.4f}" for k in log_keys if k in metrics)
        if len(trainer.dataset_names) > 1:
            line += " | share " + ", ".join(f"{n} {100 * _share(metrics, n):.1f}%" for n in trainer.dataset_names)
        print_rank0(line)


def _share(metrics: Mapping[str, Optional[float]], name: str) -> float:
    """``share/<name>``, which the blend-share callback records every step."""
    value = metrics[f"share/{name}"]
    if value is None:
        raise ValueError(f"metric 'share/{name}' is None; the blend-share callback records a number")
    return value


class MetricsFileLogger(Callback):
    """Rank 0 writes every logged split to ``logging.dir`` (default ``<checkpoint.dir>/logs``)
    through :class:`~engine.metrics.MetricsWriter`: ``metrics.jsonl``, TensorBoard, wandb.

    Opened at the start of training: records past the iteration the run starts from belong
    to an abandoned timeline (a crash after the last checkpoint) and are dropped first, so
    each step is recorded once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.writer: Optional[MetricsWriter] = None

    def on_train_start(self, trainer: "Trainer") -> None:
        if trainer.env.rank != 0:
            return
        lg = self.cfg.logging
        log_dir = lg.dir or str(Path(self.cfg.checkpoint.dir) / "logs")
        self.writer = MetricsWriter(
            log_dir, lg.tensorboard, lg.wandb_project, self.cfg.to_dict(), truncate_after=trainer.state.iteration
        )

    def log_metrics(
        self, trainer: "Trainer", step: int, metrics: Mapping[str, Optional[float]], split: str = "train"
    ) -> None:
        if self.writer is not None:
            self.writer.write(step, metrics, prefix=split)

    def on_train_end(self, trainer: "Trainer") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
