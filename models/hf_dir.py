"""A Hugging Face model directory as the engine sees it: its architecture, checked, and
the engine ``ModelConfig`` of its network (import and ``checkpoint.init_from_hf``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from engine.config import ConfigError, ModelConfig

HF_CONFIG = "config.json"


class HFImportError(ConfigError):
    """A Hugging Face directory that cannot be imported (one line; the CLI exits 2)."""


def read_hf_config(hf_dir: str | Path) -> Dict[str, Any]:
    """``config.json`` of ``hf_dir`` as a dict, its architecture checked (one-line errors)."""
    from models.hf_convert import ConversionError, hf_config_family

    path = Path(hf_dir) / HF_CONFIG
    if not path.is_file():
        raise HFImportError(f"{hf_dir}: no {HF_CONFIG}; not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HFImportError(f"{path}: not valid JSON ({exc})") from None
    try:
        hf_config_family(config)
    except ConversionError as exc:
        raise HFImportError(f"{hf_dir}: {exc}") from None
    return config


def hf_model_config(hf_dir: str | Path) -> ModelConfig:
    """The engine ``ModelConfig`` of the network in ``hf_dir`` (transformers reads the
    config, so 4.x and 5.x key styles and the classes' defaults are both honoured)."""
    from transformers import AutoConfig

    from models.hf_convert import ConversionError, model_config_from_hf

    read_hf_config(hf_dir)
    try:
        return model_config_from_hf(AutoConfig.from_pretrained(str(hf_dir)))
    except ConversionError as exc:
        raise HFImportError(f"{hf_dir}: {exc}") from None


def check_architecture(run_model: ModelConfig, hf_dir: str | Path) -> None:
    """HFImportError naming the differences when the run's model is not ``hf_dir``'s network."""
    from models.hf_convert import architecture_differences

    diff = architecture_differences(run_model, hf_model_config(hf_dir))
    if diff:
        raise HFImportError(
            f"the run's model section is not the network in {hf_dir} (run vs Hugging Face: {'; '.join(diff)}); "
            f"`python -m engine import hf {hf_dir} OUT` prints the matching model section"
        )
