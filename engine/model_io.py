"""A trained model outside the trainer: find a checkpoint, load it at any layout, save one.

Every command that takes a checkpoint (export, generate, eval, merge, quantize, prune, ...)
goes through here, so they all accept the same inputs and refuse bad ones the same way:

- ``resolve_checkpoint``: a checkpoint directory, or a run directory (its newest complete
  checkpoint); anything else is one ``ConfigError`` line.
- ``checkpoint_config``: the resolved ``config.yaml`` the run wrote into the checkpoint.
- ``load_model``: build that model at the caller's layout (default TP=PP=EP=1, one process)
  and read the weights through megatron-core's ``dist_checkpointing`` (which reshards any
  saved TP/PP/VP/EP layout), after verifying the files against the manifest. A quantized
  checkpoint (``precision.qat`` in its config) gets its modelopt quantizers back first.
- ``save_model_checkpoint``: write model weights as a normal, complete engine checkpoint
  (no optimizer state) that ``checkpoint.init_from`` and every command here accept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from engine import checkpoint as ckpt_lib
from engine.config import Config, ConfigError, ParallelConfig
from engine.optimization import modelopt_state

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint ``path`` names: itself, or a run directory's newest one.

    ConfigError (one line) when ``path`` does not exist, is an incomplete checkpoint
    (``iter_N.tmp``, no ``engine_meta.json``) or a directory without checkpoints."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such checkpoint or run directory")
    if (p / ckpt_lib.META).is_file():
        return p
    if p.is_dir() and ckpt_lib.checkpoint_root(str(p)).is_dir():
        newest = ckpt_lib.latest_checkpoint(str(p))
        if newest is None:
            raise ConfigError(
                f"{p}: run directory without a complete checkpoint (none of checkpoints/iter_* is finished)"
            )
        return newest
    raise ConfigError(
        f"{p} is not a complete engine checkpoint (no {ckpt_lib.META}) nor a run directory with checkpoints/"
    )


def checkpoint_config(ckpt: Path, overrides: Sequence[str] = ()) -> Config:
    """The resolved config the run that wrote ``ckpt`` ran with (its ``config.yaml``)."""
    from engine.run_config import load_run_config

    cfg_file = Path(ckpt) / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{ckpt}: no config.yaml in the checkpoint; the model it holds cannot be rebuilt")
    return load_run_config(cfg_file, overrides)


def config_hash(cfg: Config) -> str:
    """sha256 (16 hex digits) of the model section: equal hashes, same architecture."""
    import yaml

    text = yaml.safe_dump(dataclasses.asdict(cfg.model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class LoadedModel:
    """A checkpoint's model, built and loaded on this process at ``cfg.parallel``'s layout."""

    cfg: Config
    """The checkpoint's config, with the layout it was loaded at (``parallel``)."""
    chunks: List[torch.nn.Module]
    """This rank's ``GPTModel`` chunk(s), in eval mode; one unless virtual pipelining."""
    checkpoint: Path
    """The complete checkpoint the weights came from."""
    meta: Dict[str, Any] = field(default_factory=dict)
    """Its ``engine_meta.json`` (iteration, lineage, layout it was saved at, ...)."""

    @property
    def model(self) -> torch.nn.Module:
        """The single chunk (PP=1, no virtual stages): the whole model on this process."""
        if len(self.chunks) != 1:
            raise ValueError(f"{len(self.chunks)} model chunks on this rank; use .chunks")
        return self.chunks[0]

    @property
    def iteration(self) -> int:
        """The training iteration the checkpoint was saved at."""
        return int(self.meta.get("iteration", 0))


def inference_parallel(parallel: ParallelConfig, tensor: int = 1, pipeline: int = 1) -> ParallelConfig:
    """``parallel`` at ``tensor`` x ``pipeline`` with what only training needs switched off:
    no virtual stages, CP, EP, sequence parallelism, optimizer sharding or overlap."""
    return dataclasses.replace(
        parallel,
        tensor=tensor,
        pipeline=pipeline,
        virtual_pipeline=None,
        context=1,
        expert=1,
        sequence_parallel=False,
        distributed_optimizer=False,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
    )


def single_process_layout(cfg: Config) -> Config:
    """``cfg`` at TP=PP=CP=EP=1 without virtual stages or sequence parallelism: the whole
    model on one process (what export, import and merging work on)."""
    return dataclasses.replace(
        cfg,
        parallel=inference_parallel(cfg.parallel),
        training=dataclasses.replace(cfg.training, recompute="none"),
    )


def build_model(cfg: Config, dtype: torch.dtype) -> List[torch.nn.Module]:
    """Initialise torch.distributed and megatron's groups for ``cfg.parallel`` (one process
    when not launched by torchrun) and build this rank's chunks, uninitialised weights."""
    from engine.precision import resolve_fp8
    from models.build import build_gpt_chunks
    from parallel.setup import init_distributed, init_model_parallel

    env = init_distributed(cfg.parallel)
    init_model_parallel(cfg.parallel, cfg.training.seed)
    # FP8 is a training-time GEMM recipe: the weights are bf16/fp32 and load without TE.
    fp8 = resolve_fp8(cfg) if cfg.precision.dtype == "fp8" else None
    chunks = build_gpt_chunks(cfg, dtype, fp8=fp8).chunks
    for c in chunks:
        c.to(env.device)
    return chunks


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    parallel: Optional[ParallelConfig] = None,
    overrides: Sequence[str] = (),
) -> LoadedModel:
    """Load the checkpoint at ``path`` (checkpoint or run directory) for inference.

    ``parallel``: the layout to load at (default: one process, TP=PP=EP=1; any layout the
    world size allows works, whatever layout the checkpoint was saved at). ``dtype``: the
    parameter dtype of the built model. Memory: the model's parameters once in ``dtype``
    (a 3B model: 12 GiB in fp32, 6 GiB in bf16) plus dist_checkpointing's read buffers."""
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt, overrides)
    if cfg.precision.dtype == "fp8":  # weights are kept in bf16 under an FP8 recipe
        cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, dtype="bf16"))
    cfg = single_process_layout(cfg) if parallel is None else dataclasses.replace(cfg, parallel=parallel)
    chunks = build_model(cfg, dtype)
    if cfg.precision.qat:  # a quantized model: its fake quantizers exist before weights load
        chunks = modelopt_state.restore(chunks, ckpt)
    ckpt_lib.load_checkpoint(ckpt, chunks, optimizer=None, load_optimizer=False)
    for c in chunks:
        c.eval()
    return LoadedModel(cfg=cfg, chunks=chunks, checkpoint=ckpt, meta=ckpt_lib.read_meta(ckpt))


def save_model_checkpoint(
    run_dir: str | Path,
    cfg: Config,
    chunks: List[torch.nn.Module],
    iteration: int = 0,
    lineage: Sequence[Dict[str, Any]] = (),
) -> Path:
    """Write ``chunks``' weights as the complete checkpoint ``run_dir/checkpoints/iter_N``
    (atomic, with manifest; no optimizer state), its ``config.yaml`` being ``cfg`` with
    ``checkpoint.dir`` set to ``run_dir``. Refused (CheckpointError) when that checkpoint
    exists. All ranks of the current layout call it."""
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir=str(run_dir)))
    state = ckpt_lib.TrainState(iteration=iteration, lineage=list(lineage))
    return ckpt_lib.save_checkpoint(
        str(run_dir), state, chunks, optimizer=None, scheduler=None, config_yaml=cfg.to_yaml(), save_optimizer=False
    )
