"""Throughput, MFU and memory figures, and where logged metrics go (stdout, JSONL, TensorBoard, wandb).

Every number is computed from the config and measured times, never assumed: FLOPs per
token come from the architecture (``ModelConfig.flops_per_token``), the peak from a table
of dense (non-sparse) tensor-core throughput per GPU model and precision
(``parallel.hardware.PEAK_TFLOPS``, shared with the planner). On CPU, MFU is "n/a".
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path
from typing import Mapping, Optional

import torch

from parallel.hardware import PEAK_TFLOPS

log = logging.getLogger(__name__)


def detect_gpu() -> Optional[str]:
    """Key of PEAK_TFLOPS for the current CUDA device, or None (CPU / unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    return gpu_key(torch.cuda.get_device_name())


def gpu_key(device_name: str) -> Optional[str]:
    """Key of PEAK_TFLOPS for a CUDA device name (``NVIDIA H200``), or None when unknown."""
    name = device_name.lower()
    for key in ("gb200", "b200", "h200", "h100", "a100"):
        if key in name:
            return key
    return None


def peak_memory_gib() -> float:
    """Peak memory of this process: CUDA max allocated, or the CPU resident-set high-water mark."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def mfu(tokens_per_s_per_gpu: float, flops_token: float, gpu: Optional[str], precision: str) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown (CPU)."""
    if gpu is None or gpu not in PEAK_TFLOPS:
        return None
    peak = PEAK_TFLOPS[gpu].get(precision)
    if not peak:
        return None
    return tokens_per_s_per_gpu * flops_token / (peak * 1e12)


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` with ``step > last_step`` (and a torn last line), atomically
    (a new file renamed over the old); returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Rank-0 sink for metrics: a JSONL file (one record per step), TensorBoard, wandb.

    ``truncate_after``: the iteration the run starts from. Records of later steps in an
    existing ``metrics.jsonl`` were written by a run that crashed after its last checkpoint;
    they are dropped before anything is appended, so every step appears once per split."""

    def __init__(
        self,
        log_dir: str,
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        run_config=None,
        truncate_after: Optional[int] = None,
    ):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None:
            dropped = truncate_jsonl(self.dir / "metrics.jsonl", truncate_after)
            if dropped:
                log.warning(
                    "metrics.jsonl: dropped %d record(s) after step %d (not in the checkpoint resumed from)",
                    dropped,
                    truncate_after,
                )
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; TensorBoard logging is off")
        self.wandb = None
        if wandb_project:
            import wandb  # fail loudly: the user asked for it

            self.wandb = wandb.init(project=wandb_project, config=run_config, dir=str(self.dir))

    def write(self, step: int, metrics: Mapping[str, Optional[float]], prefix: str = "train") -> None:
        """Record ``metrics`` for ``step`` in every sink."""
        record = {"step": step, "split": prefix, **{k: v for k, v in metrics.items() if v is not None}}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        """Flush and close every sink."""
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_line(step: int, total: int, m: Mapping[str, Optional[float]]) -> str:
    """The human-readable log line of one step."""

    def f(key, fmt, unit=""):
        v = m.get(key)
        return "n/a" if v is None else format(v, fmt) + unit

    mfu = m.get("mfu")
    return (
        f"step {step}/{total} | loss {f('loss', '.4f')} | lr {f('lr', '.3e')} | "
        f"grad_norm {f('grad_norm', '.3f')} | step {f('step_time', '.3f', 's')} | "
        f"tok/s/gpu {f('tokens_per_s_per_gpu', ',.0f')} | tok/s {f('tokens_per_s', ',.0f')} | "
        f"MFU {('n/a' if mfu is None else format(100 * mfu, '.1f') + '%')} | "
        f"peak mem {f('peak_mem_gib', '.2f', ' GiB')}"
        + (f" | skipped {m['skipped_total']}" if m.get("skipped_total") else "")
    )


def print_rank0(*args) -> None:
    """print() on global rank 0 only (flushes: logs are read live)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)
        sys.stdout.flush()
