"""Run megatron-core's real layers, schedules, optimizer and checkpointing on CPU over gloo.

megatron-core 0.16.1 assumes CUDA in a handful of places (see
shared/notes/megatron-core-on-cpu.md). This module redirects exactly those, and nothing
else, so that tensor/pipeline/expert/data parallelism can be exercised by several CPU
processes in CI. It is a development and CI backend, never a production path:
``activate()`` refuses to run when CUDA is available and logs loudly what it changed.
"""

from __future__ import annotations

import logging
import threading
from typing import List

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_active: List[str] = []
_CPU = torch.device("cpu")
_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an int means cuda:N


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device=cuda`` in factory calls and ``.to('cuda')`` / ``.cuda()`` to CPU.

    megatron-core hard-codes ``device="cuda"`` in several places (e.g. the pipeline
    schedules' loss counters)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **kwargs)


class _NoStream:
    """Stand-in for torch.cuda.Stream / Event: every call is a no-op on CPU and returns
    another stand-in (``stream.record_event().synchronize()`` chains)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: _NoStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    # megatron-core's optimizers check ``param.type() == 'torch.cuda.FloatTensor'``.
    if dtype is None and not self.is_cuda and self.dtype in _TYPE_NAMES:
        return _TYPE_NAMES[self.dtype]
    if dtype is None:
        return _ORIG_TENSOR_TYPE(self)
    return _ORIG_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


_ORIG_TENSOR_TYPE = torch.Tensor.type


_TAG_FORWARD, _TAG_BACKWARD = 1, 2


def _seed_cpu_generator(seed: int) -> None:
    """torch.cuda.manual_seed on the CPU backend: seeds the CPU generator."""
    torch.default_generator.manual_seed(int(seed))


def _tagged_batched_p2p_ops(
    *,
    tensor_send_prev,
    tensor_recv_prev,
    tensor_send_next,
    tensor_recv_next,
    group,
    prev_pipeline_rank,
    next_pipeline_rank,
):
    """megatron-core's batched pipeline p2p with a gloo tag per direction (see activate())."""
    dist = torch.distributed
    ops = []
    # Activations flow forward (send_next -> recv_prev), gradients backward (send_prev -> recv_next).
    for op, tensor, peer, tag in (
        (dist.isend, tensor_send_prev, prev_pipeline_rank, _TAG_BACKWARD),
        (dist.irecv, tensor_recv_prev, prev_pipeline_rank, _TAG_FORWARD),
        (dist.isend, tensor_send_next, next_pipeline_rank, _TAG_FORWARD),
        (dist.irecv, tensor_recv_next, next_pipeline_rank, _TAG_BACKWARD),
    ):
        if tensor is not None:
            ops.append(dist.P2POp(op, tensor, peer, group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def activate() -> List[str]:
    """Redirect megatron-core's CUDA assumptions to the CPU (idempotent).

    Returns the list of redirections made. Raises RuntimeError when CUDA is available,
    because then the real CUDA path must be used."""
    with _lock:
        if _active:
            return list(_active)
        if torch.cuda.is_available():
            raise RuntimeError("the CPU backend must not be activated on a machine with CUDA")

        # 1. Device placement of buffers (rotary inv_freq, global memory buffer, ...).
        # A torch.device where torch declares an int (both work as a device= argument).
        torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment,return-value]  # deliberate CPU stand-in
        _active.append("torch.cuda.current_device -> cpu")

        # 2. RNG: megatron's CUDA RNG tracker forks the CPU generator instead.
        import megatron.core.tensor_parallel.random as mrandom

        torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
        torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator
        # directly and make the "all CUDA devices" variant a no-op to avoid recursion.
        torch.cuda.manual_seed = _seed_cpu_generator
        torch.cuda.manual_seed_all = lambda seed: None
        mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
        mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        _active.append("CUDA RNG tracker -> CPU generator state")

        # 3. Hard-coded device="cuda" and .cuda()/.to("cuda").
        _CudaToCpuMode().__enter__()  # stays on for the life of the process
        _active.append("device='cuda' / .cuda() / .to('cuda') -> cpu (TorchFunctionMode)")

        # 4. Streams, events and synchronisation.
        torch.cuda.synchronize = lambda *a, **k: None
        # _NoStream stands in for Stream, Event and StreamContext alike (deliberately not their types).
        torch.cuda.Stream = _NoStream  # type: ignore[misc,assignment]  # deliberate CPU stand-in
        torch.cuda.Event = _NoStream  # type: ignore[misc,assignment]  # deliberate CPU stand-in
        torch.cuda.stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]  # deliberate CPU stand-in
        torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]  # deliberate CPU stand-in
        _active.append("torch.cuda streams/events/synchronize -> no-ops")

        # 5. Optimizer dtype checks on Tensor.type().
        torch.Tensor.type = _tensor_type  # type: ignore[method-assign]  # the point of this patch
        _active.append("Tensor.type() reports torch.cuda.*Tensor names")

        # 6. MoE: a NameError in 0.16.1 without TE, and CPU split sizes for all_to_all.
        import megatron.core.transformer.moe.moe_utils as moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
        orig_move = moe_utils.maybe_move_tensor_to_cpu

        def move_to_cpu(tensor, as_numpy=False, record_stream=False):
            if as_numpy and torch.is_tensor(tensor):
                return tensor.numpy()
            return orig_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

        moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
        try:
            import megatron.core.transformer.moe.token_dispatcher as dispatcher

            dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
        except ImportError:  # pragma: no cover - module layout differs in other versions
            pass
        _active.append("MoE: te_general_gemm=None, all_to_all split sizes as numpy")

        # 7. Pipeline p2p: with 2 pipeline ranks (a ring) under interleaving, a rank sends an
        #    activation and a gradient to the same peer in one batch. NCCL keeps the pairs
        #    apart; gloo matches sends to receives by (peer, tag) in posting order and would
        #    swap the two equally-shaped tensors. Distinct tags per direction keep them apart.
        import megatron.core.pipeline_parallel.p2p_communication as p2p

        p2p._batched_p2p_ops = _tagged_batched_p2p_ops
        _active.append("pipeline p2p: one gloo tag per direction")

        log.warning("CPU backend ACTIVE (development/CI only, not a production path): %s", "; ".join(_active))
        return list(_active)
