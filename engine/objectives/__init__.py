"""Training objectives: each one turns a micro-batch into a loss and metrics.

The loop never branches on the stage; it asks ``build_objective(cfg)`` for an object with
``forward_step(data_iterator, model)`` (megatron-core's forward-step contract),
``metric_names`` and ``finalize_metrics``, and builds the data the objective names in
``data_kind`` (see ``engine/data/builders.py``).
"""

from typing import List

from engine.config import Config
from engine.objectives.base import Objective
from engine.objectives.dpo import DPOObjective
from engine.objectives.orpo import ORPOObjective
from engine.objectives.pretrain import PretrainObjective
from engine.objectives.sft import SFTObjective

OBJECTIVES = {"pretrain": PretrainObjective, "sft": SFTObjective, "orpo": ORPOObjective, "dpo": DPOObjective}


def check_objective(cfg: Config) -> List[str]:
    """The objectives' check of the config (``engine.run_config.RUN_CHECKS``): a known name."""
    if cfg.objective.name not in OBJECTIVES:
        return [f"objective.name is {cfg.objective.name!r}; choose one of {', '.join(OBJECTIVES)}"]
    return []


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``cfg.objective.name``, built from the config."""
    return OBJECTIVES[cfg.objective.name](cfg)
