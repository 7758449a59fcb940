"""Per-step figures measured around the step: time, tokens per second, MFU, peak memory, and
the realised share of each data source."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Dict, Optional

import torch

from engine.callbacks.base import Callback
from engine.metrics import detect_gpu, mfu, peak_memory_gib

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer


class ThroughputCallback(Callback):
    """``step_time``, ``tokens_per_s`` (all GPUs), ``tokens_per_s_per_gpu``, ``mfu`` (None when
    the peak of the device is unknown, e.g. CPU) and ``peak_mem_gib`` of every step.

    The step time runs from ``on_step_start`` to ``record_metrics``, after a CUDA synchronize,
    so it includes the forward-backward pass, the optimizer step and ``pre_optim_step`` hooks."""

    def __init__(self, gpu: Optional[str] = None):
        self.gpu_override = gpu
        self._start = 0.0

    def on_train_start(self, trainer: "Trainer") -> None:
        from engine.precision import mfu_precision

        cfg = trainer.cfg
        self.tokens_per_step = (
            cfg.training.global_batch_size * trainer.objective.sequences_per_sample * cfg.data.seq_length
        )
        self.world = trainer.env.world_size
        self.gpu = self.gpu_override or detect_gpu()
        self.flops_token = cfg.model.flops_per_token(cfg.data.seq_length)
        self.precision = mfu_precision(trainer.tf_config, trainer.dtype)  # fixed for the run

    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        self._start = time.perf_counter()

    def record_metrics(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels belong to its time
        elapsed = time.perf_counter() - self._start
        per_gpu = self.tokens_per_step / elapsed / self.world
        metrics.update(
            step_time=elapsed,
            tokens_per_s=self.tokens_per_step / elapsed,
            tokens_per_s_per_gpu=per_gpu,
            peak_mem_gib=peak_memory_gib(),
        )
        metrics["mfu"] = mfu(per_gpu, self.flops_token, self.gpu, self.precision)


class SourceShareCallback(Callback):
    """``share/<source>``: each blended source's fraction of the tokens consumed so far (from
    ``trainer.state.source_tokens``, which the checkpoint carries across resumes)."""

    def record_metrics(self, trainer: "Trainer", step: int, metrics: Dict[str, Optional[float]]) -> None:
        tokens = trainer.state.source_tokens
        if len(tokens) < 2:
            return
        total = sum(tokens) or 1.0
        for name, count in zip(trainer.dataset_names, tokens):
            metrics[f"share/{name}"] = count / total
