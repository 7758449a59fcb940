"""Process groups from the config: torch.distributed + megatron-core parallel_state.

Works under ``torchrun``/``srun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment)
and as one plain process (a single-rank group on a free local port). NCCL when CUDA is
there, gloo otherwise; on CPU the CUDA redirections of ``parallel.cpu_backend`` are
activated first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

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
        parallel_state.destroy_model_parallel()
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


def shutdown() -> None:
    """Tear down megatron's groups and the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
