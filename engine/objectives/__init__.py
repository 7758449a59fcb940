"""Training objectives: each one turns a micro-batch into a loss and metrics.

The loop never branches on the stage; it asks ``build_objective(cfg)`` for an object with
``forward_step(data_iterator, model)`` (megatron-core's forward-step contract),
``metric_names`` and ``finalize_metrics``, and builds the data the objective names in
``data_kind`` (see ``engine/data/builders.py``).
"""

from engine.config import Config
from engine.objectives.base import Objective
from engine.objectives.distill import DistillObjective
from engine.objectives.dpo import DPOObjective
from engine.objectives.orpo import ORPOObjective
from engine.objectives.pretrain import PretrainObjective
from engine.objectives.sft import SFTObjective

OBJECTIVES = {
    "pretrain": PretrainObjective,
    "sft": SFTObjective,
    "orpo": ORPOObjective,
    "dpo": DPOObjective,
    "distill": DistillObjective,
}

# ``objective.name`` is a Literal of these names, checked by the config loader
# (tests/engine/test_config.py keeps the two in step), so config-only commands never import
# the objectives (torch, megatron-core).


def build_objective(cfg: Config) -> Objective:
    """The objective named by ``cfg.objective.name``, built from the config."""
    return OBJECTIVES[cfg.objective.name](cfg)
