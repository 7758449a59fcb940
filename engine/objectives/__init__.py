"""Training objectives: each one turns a micro-batch into a loss and metrics.

The loop never branches on the stage; it asks ``build_objective(name)`` for an object with
``forward_step(data_iterator, model)`` (megatron-core's forward-step contract) and
``reduce_metrics``.
"""
from engine.objectives.base import Objective
from engine.objectives.pretrain import PretrainObjective

OBJECTIVES = {"pretrain": PretrainObjective}


def build_objective(name: str) -> Objective:
    """The objective registered under ``name``."""
    return OBJECTIVES[name]()
