"""Throughput, MFU and memory figures, and where logged metrics go (stdout, JSONL, TensorBoard, wandb).

Every number is computed from the config and measured times, never assumed: FLOPs per
token come from the architecture, the peak from a table of dense (non-sparse) tensor-core
throughput per GPU model and precision. On CPU, MFU is "n/a".
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from engine.config import ModelConfig, padded_vocab_size

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per GPU from the vendors' data sheets (SXM parts, no sparsity).
PEAK_TFLOPS = {
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "mxfp8": 4500.0, "fp32": 75.0},
    "gb200": {"bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0, "mxfp8": 5000.0, "fp32": 80.0},
}


def detect_gpu() -> Optional[str]:
    """Key of PEAK_TFLOPS for the current CUDA device, or None (CPU / unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    for key in ("gb200", "b200", "h200", "h100", "a100"):
        if key in name:
            return key
    return None


def attention_keys_per_query(seq: int, window: int) -> float:
    """Average keys a query attends to under a causal mask, optionally windowed."""
    if window and window < seq:
        # First `window` queries see 1..window keys, the rest see `window`.
        return (window * (window + 1) / 2 + (seq - window) * window) / seq
    return (seq + 1) / 2


def flops_per_token(model: ModelConfig, seq_length: int, training: bool = True) -> float:
    """Model FLOPs per token (matmuls only, 2 per multiply-add; x3 for training).

    Counts projections, MLP (top-k experts for MoE, plus the router), the causal
    (and sliding-window) attention score and value products, and the LM head."""
    h = model.hidden_size
    heads = model.num_attention_heads
    head_dim = model.kv_channels or h // heads
    groups = model.num_query_groups or heads
    q_dim, kv_dim = heads * head_dim, groups * head_dim
    proj = 2 * (h * (q_dim + 2 * kv_dim) + q_dim * h)
    mats = 3 if model.activation == "swiglu" else 2
    if model.num_experts:
        ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
        mlp = 2 * model.moe_router_topk * mats * h * ffn + 2 * h * model.num_experts
    else:
        mlp = 2 * mats * h * model.ffn_hidden_size
    attn = 0.0
    for layer in range(model.num_layers):
        windowed = model.sliding_window and (
            model.sliding_window_layers == "all"
            or (model.sliding_window_layers == "even") == (layer % 2 == 0)
        )
        keys = attention_keys_per_query(seq_length, model.sliding_window if windowed else 0)
        attn += 2 * 2 * keys * q_dim
    head = 2 * h * padded_vocab_size(model)
    forward = model.num_layers * (proj + mlp) + attn + head
    return forward * (3 if training else 1)


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

    def __init__(self, log_dir: str, tensorboard: bool = True, wandb_project: Optional[str] = None, run_config=None,
                 truncate_after: Optional[int] = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None:
            dropped = truncate_jsonl(self.dir / "metrics.jsonl", truncate_after)
            if dropped:
                log.warning("metrics.jsonl: dropped %d record(s) after step %d (not in the checkpoint resumed from)",
                            dropped, truncate_after)
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

    def write(self, step: int, metrics: Dict[str, float], prefix: str = "train") -> None:
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


def format_line(step: int, total: int, m: Dict[str, Optional[float]]) -> str:
    """The human-readable log line of one step."""
    def f(key, fmt, unit=""):
        v = m.get(key)
        return "n/a" if v is None else format(v, fmt) + unit

    return (
        f"step {step}/{total} | loss {f('loss', '.4f')} | lr {f('lr', '.3e')} | "
        f"grad_norm {f('grad_norm', '.3f')} | step {f('step_time', '.3f', 's')} | "
        f"tok/s/gpu {f('tokens_per_s_per_gpu', ',.0f')} | tok/s {f('tokens_per_s', ',.0f')} | "
        f"MFU {('n/a' if m.get('mfu') is None else format(100 * m['mfu'], '.1f') + '%')} | "
        f"peak mem {f('peak_mem_gib', '.2f', ' GiB')}"
        + (f" | skipped {m['skipped_total']}" if m.get("skipped_total") else "")
    )


def print_rank0(*args) -> None:
    """print() on global rank 0 only (flushes: logs are read live)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*args, flush=True)
        sys.stdout.flush()
