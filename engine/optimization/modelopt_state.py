"""nvidia-modelopt's state in engine checkpoints: written with the weights, restored before them.

A model that modelopt has converted (fake quantizers inserted by ``mtq.quantize``) is no
longer the model ``models.build`` makes: its checkpoint holds extra tensors (quantizer
``_amax``, SmoothQuant/AWQ ``_pre_quant_scale``) and per-module ``_extra_state``. modelopt's
megatron-core plugin splits that state in two, and the engine keeps the split:

- the modes applied and their configs: ``<checkpoint>/modelopt_state/`` (written by
  ``save_sharded_modelopt_state`` next to the dist_checkpointing files, so the checkpoint's
  manifest covers it, and it is complete exactly when the checkpoint is);
- the per-module quantizer state: in the model's own sharded state dict, saved and resharded
  with the weights like any other tensor.

Restoring is therefore two steps, in this order: ``restore`` re-applies the modes to a
freshly built model (the quantizers exist again), then the normal checkpoint load fills
weights and quantizer tensors. Every loader does it before loading weights, and the
trainer before DDP wraps the model and before the optimizer is built (Megatron-LM's model
builder does the same), so that the optimizer sees the converted model's parameters.

This module imports nothing of the engine beyond its config layer: the checkpoint code calls
it, and it must not call back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch

from engine.config import ConfigError

STATE_DIR = "modelopt_state"
"""Sub-directory of a checkpoint holding modelopt's modes and their configs."""


class ModeloptMissingError(ConfigError):
    """The checkpoint or command needs nvidia-modelopt and it is not installed."""


def require_modelopt() -> None:
    """Raise ModeloptMissingError (one line: what to install) unless modelopt imports."""
    try:
        import modelopt.torch.opt  # noqa: F401
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        raise ModeloptMissingError(
            "nvidia-modelopt is not installed (quantization needs it): pip install -e .[opt]"
        ) from None


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether modelopt's quantization modes have converted ``model`` (without importing
    modelopt when nothing did). Other modelopt conversions (the distillation objective's,
    whose mode holds the teacher; LoRA's, re-applied from ``finetune.lora``) are not saved
    here: their owners rebuild them from the config."""
    if "modelopt.torch.opt" not in sys.modules:  # never imported: nothing can be converted
        return False
    import modelopt.torch.opt as mto

    if not mto.ModeloptStateManager.is_converted(model):
        return False
    return mto.ModeloptStateManager.has_state_for_mode_type("quantization", model=model)


def has_state(ckpt: Path) -> bool:
    """Whether the checkpoint directory ``ckpt`` carries modelopt state."""
    return (Path(ckpt) / STATE_DIR).is_dir()


def quantization_format(ckpt: Path) -> Optional[str]:
    """The quantization format (``precision.qat``) the checkpoint ``ckpt``'s config records;
    None for an unquantized model or a directory without ``config.yaml``."""
    cfg_file = Path(ckpt) / "config.yaml"
    if not cfg_file.is_file():
        return None
    import yaml

    values = yaml.safe_load(cfg_file.read_text()) or {}
    return (values.get("precision") or {}).get("qat")


def save(chunks: List[torch.nn.Module], directory: Path) -> None:
    """Write the modelopt state of ``chunks`` (this rank's unwrapped model chunks) into the
    checkpoint directory being written; nothing when they are not quantized. All ranks call
    (dist_checkpointing's save is collective)."""
    if not chunks or not is_quantized(chunks[0]):
        return
    if len(chunks) > 1:
        raise ConfigError("modelopt state cannot be saved with parallel.virtual_pipeline (one model chunk per rank)")
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    save_sharded_modelopt_state(chunks, str(directory))


def restore(chunks: List[torch.nn.Module], ckpt: Path) -> List[torch.nn.Module]:
    """Re-apply the modelopt modes saved in ``ckpt`` to the freshly built ``chunks`` (before
    any weight is loaded); returns the chunks (modelopt may replace modules). The quantizer
    tensors come with the weights afterwards. ConfigError (one line) when ``ckpt`` has no
    modelopt state, modelopt is missing, or the layout has several chunks per rank."""
    if not has_state(ckpt):
        raise ConfigError(f"{ckpt}: no {STATE_DIR}/ (the checkpoint is not a modelopt-quantized one)")
    require_modelopt()
    if len(chunks) != 1:
        raise ConfigError(
            "a quantized model cannot be loaded with parallel.virtual_pipeline: modelopt keeps one model chunk per rank"
        )
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    chunks = list(chunks)
    restore_sharded_modelopt_state(chunks, str(ckpt))
    return chunks
