"""Clean stops on scheduler signals: finish the step, checkpoint, exit with a requeue code.

SLURM sends ``SIGUSR1`` ahead of the time limit (``sbatch --signal=USR1@120``) and
``SIGTERM`` on preemption or ``scancel``. The handler only sets a flag; after every step
all ranks all-reduce (MAX) that flag, because a signal may reach only some ranks and the
ranks must agree to stop after the same step (they all take part in the checkpoint). The
loop then writes a checkpoint and raises ``StopTraining`` with ``preemption.exit_code``
(75 by default), which ``python -m engine train`` returns and the SLURM scripts turn into
``scontrol requeue``. The requeued job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from engine.callbacks.base import Callback

if TYPE_CHECKING:  # the trainer calls its callbacks: an import for types only
    from engine.trainer import Trainer

# What signal.signal returns and accepts: a handler, SIG_DFL/SIG_IGN, or None (installed outside Python).
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, signal.Handlers, None]


class PreemptionHandler(Callback):
    """Installs the signal handlers and turns a received signal into an agreed stop."""

    def __init__(self, signals: List[str], exit_code: int, all_reduce_max: Optional[Callable[[int], int]] = None):
        self.signals = [getattr(signal, name) for name in signals]
        self.exit_code = exit_code
        self.received: Optional[int] = None
        self.all_reduce_max = all_reduce_max or _all_reduce_max
        self._previous: Dict[int, _Handler] = {}

    def _handle(self, signum, frame) -> None:
        # Only a flag: the step in flight (maybe inside a collective) must finish normally.
        if self.received is None:
            self.received = signum
            print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint", flush=True)

    def on_train_start(self, trainer: "Trainer") -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): signals stay as they were
                pass

    def on_step_end(self, trainer: "Trainer", step: int, metrics) -> None:
        local = int(self.received or 0)
        agreed = self.all_reduce_max(local)
        if agreed:
            name = signal.Signals(agreed).name
            trainer.request_stop(
                self.exit_code,
                f"{name} received (on at least one rank): checkpointed "
                f"at step {step}; exit code {self.exit_code} asks the scheduler to requeue",
            )

    def on_train_end(self, trainer: "Trainer") -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _all_reduce_max(value: int) -> int:
    """MAX of ``value`` over all ranks (one tiny collective per step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    flag = torch.tensor([value], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
