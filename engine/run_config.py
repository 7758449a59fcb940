"""A run's config as the engine loads and checks it: presets resolved, every subsystem's checks.

``engine.config`` imports nothing of the project (it is the ground floor every layer may
import), so it cannot know the model presets, the objectives or the FP8 rules. This module
joins them: the CLI commands, the trainer and tests load through ``load_run_config`` and
check through ``validate_run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from engine.config import Config, ConfigCheck, ConfigError, load_config, validate
from engine.precision import check_fp8_config
from models.presets import get_preset


def check_init_from_hf(cfg: Config) -> List[str]:
    """``checkpoint.init_from_hf`` must name a supported Hugging Face directory holding the
    network ``model`` describes."""
    if not cfg.checkpoint.init_from_hf:
        return []
    from models.hf_dir import check_architecture

    try:
        check_architecture(cfg.model, cfg.checkpoint.init_from_hf)
    except ConfigError as exc:
        return [f"checkpoint.init_from_hf: {exc}"]
    return []


RUN_CHECKS: Tuple[ConfigCheck, ...] = (check_fp8_config, check_init_from_hf)
"""The subsystems' own checks, reported together with ``validate``'s cross-section rules."""


def load_run_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """``load_config`` with ``model.preset`` resolved from ``models.presets``."""
    return load_config(path, overrides, presets=get_preset)


def validate_run(cfg: Config, world_size: int) -> None:
    """``validate`` with the subsystems' checks (``RUN_CHECKS``): what a run must pass."""
    validate(cfg, world_size, checks=RUN_CHECKS)
