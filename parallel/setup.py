"""Process groups from the config: torch.distributed + megatron-core parallel_state.

Works under ``torchrun``/``srun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment)
and as one plain process (a single-rank group on a free local port). NCCL when CUDA is
there, gloo otherwise; on CPU the CUDA redirections of ``parallel.cpu_backend`` are
activated first.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist

from engine.config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def world_size_from_env() -> int:
    """World size the launcher announced (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(parallel: ParallelConfig) -> DistEnv:
    """Initialise torch.distributed (if needed) on the configured backend."""
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=nccl needs CUDA; use gloo (or auto) on CPU")
    if not torch.cuda.is_available():
        from parallel import cpu_backend

        cpu_backend.activate()
    rank = int(os.environ.get("RANK", "0"))
    world = world_size_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if "MASTER_ADDR" not in os.environ:
            if world != 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is unset: start with torchrun or srun")
            # One process: an in-memory store, so no port can be taken by someone else.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_model_parallel(parallel: ParallelConfig, seed: int) -> None:
    """Create megatron-core's TP/PP/CP/EP/DP groups and seed the model-parallel RNGs."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def describe_layout() -> str:
    """One line: this rank's coordinates in every parallel dimension."""
    from megatron.core import parallel_state as ps

    return (
        f"rank {dist.get_rank()}/{dist.get_world_size()}: "
        f"tp {ps.get_tensor_model_parallel_rank()}/{ps.get_tensor_model_parallel_world_size()} "
        f"pp {ps.get_pipeline_model_parallel_rank()}/{ps.get_pipeline_model_parallel_world_size()} "
        f"dp {ps.get_data_parallel_rank()}/{ps.get_data_parallel_world_size()} "
        f"ep {ps.get_expert_model_parallel_rank()}/{ps.get_expert_model_parallel_world_size()}"
    )


def _megatron_groups() -> List[dist.ProcessGroup]:
    """Every process group megatron-core's parallel_state holds (its module globals: single
    groups, and lists or dicts of them), without the default group."""
    from megatron.core import parallel_state

    found: Dict[int, dist.ProcessGroup] = {}

    def visit(value) -> None:
        if isinstance(value, dist.ProcessGroup):
            found.setdefault(id(value), value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for name, value in vars(parallel_state).items():
        if "GROUP" in name:  # _TENSOR_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP_GLOO, ...
            visit(value)
    world = dist.group.WORLD if dist.is_initialized() else None
    return [g for g in found.values() if g is not world]


def destroy_model_parallel() -> None:
    """megatron-core's ``destroy_model_parallel`` plus the groups themselves.

    megatron-core only forgets its groups; each gloo group keeps its connections and
    transport threads (about 50 per layout on this stack). A process that builds layouts
    repeatedly (the test suite, commands that load several checkpoints) would accumulate
    them, and their threads compete for the CPU. So the groups are destroyed first."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        for group in _megatron_groups():
            try:
                dist.destroy_process_group(group)
            except (ValueError, RuntimeError):  # already destroyed, or not a member
                pass
    parallel_state.destroy_model_parallel()
    # The groups sit in reference cycles: only the cyclic collector frees them (and stops
    # their transport threads).
    gc.collect()


def shutdown() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
