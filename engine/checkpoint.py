"""Checkpoints through megatron-core ``dist_checkpointing``: reshardable, atomic, self-describing.

Layout of a run directory::

    <dir>/checkpoints/iter_0000100/       # complete checkpoint (dist_checkpointing files)
        engine_meta.json                  # iteration, data position, lineage; written last
        config.yaml                       # the resolved config of the run that wrote it
        manifest.json                     # size + CRC-32 of every other file (engine/ckpt_manifest.py)
        modelopt_state/                   # quantized models only: modelopt's modes (engine/optimization/modelopt_state.py)
    <dir>/checkpoints/iter_0000200.tmp/   # being written: never taken as a checkpoint
    <dir>/checkpoints/iter_0000300.corrupt/  # failed verification, set aside by a fallback resume

A checkpoint is written under a ``.tmp`` name and renamed once every rank has finished,
so a crash mid-write leaves nothing that looks complete. The newest checkpoint is found by
the iteration number in complete directories, never by sorting names. Model and optimizer
state are saved in megatron-core's "fully_reshardable" format, so they load at any
TP/PP/DP layout.

Safety rules (each enforced here, not by callers' discipline):
- no checkpoint holding a non-finite model or optimizer tensor is written (``NonFiniteStateError``);
- a complete checkpoint is never overwritten (``CheckpointError``);
- retention deletes only checkpoints older than the newest ``keep`` complete ones, and never
  a protected one (the checkpoint the run started from);
- a checkpoint is verified against its manifest before it is loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from engine.ckpt_manifest import CorruptCheckpointError, verify_manifest, write_manifest
from engine.config import ConfigError
from engine.optimization import modelopt_state

log = logging.getLogger(__name__)

META = "engine_meta.json"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}

KeyFilter = Optional[Callable[[str], bool]]
"""Which model state keys a checkpoint holds or a load reads (None: all of them). LoRA saves
and resumes only the adapters, and reads the base weights from the base checkpoint."""


class CheckpointError(ConfigError):
    """A checkpoint operation the run must not do (overwrite a complete checkpoint, mix
    timelines, resume past the target). A ConfigError: the CLI reports it in one line."""


class NonFiniteStateError(RuntimeError):
    """Model or optimizer state holds NaN/Inf: such a state is never written as a checkpoint."""


@dataclass
class TrainState:
    """Everything about progress that is not a tensor: restored exactly on resume."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    lineage: List[Dict[str, Any]] = field(default_factory=list)
    source_tokens: List[float] = field(default_factory=list)
    """Loss tokens consumed from each blended source so far (the realised mixture survives
    a resume)."""
    skipped_steps: int = 0
    """Optimizer steps skipped so far because the loss or gradient norm was not finite."""


def checkpoint_root(run_dir: str) -> Path:
    """Directory holding the ``iter_*`` checkpoints of a run."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str) -> List[Path]:
    """Complete checkpoints of a run, oldest first (by iteration number)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _ITER_DIR.match(d.name)
        if m and d.is_dir() and (d / META).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: str) -> Optional[Path]:
    """The complete checkpoint with the highest iteration, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_meta(ckpt: Path) -> Dict[str, Any]:
    """The engine metadata of a checkpoint (iteration, data position, config, lineage)."""
    return json.loads((Path(ckpt) / META).read_text())


def checkpoint_objective(ckpt: Path) -> Optional[str]:
    """The objective (``pretrain``, ``sft``, ``orpo``, ``dpo``...) of the run that wrote ``ckpt``."""
    meta = read_meta(ckpt)
    if meta.get("objective"):
        return meta["objective"]
    cfg_file = Path(ckpt) / "config.yaml"
    if cfg_file.is_file():
        import yaml

        return ((yaml.safe_load(cfg_file.read_text()) or {}).get("objective") or {}).get("name")
    return None


def read_lineage(ckpt: Path) -> List[Dict[str, Any]]:
    """The stages that led to ``ckpt``, oldest first, ending with ``ckpt`` itself: each a dict
    with the checkpoint path (``init_from``), its ``iteration`` and its ``objective``."""
    meta = read_meta(ckpt)
    return list(meta.get("lineage", [])) + [
        {"init_from": str(ckpt), "iteration": meta.get("iteration"), "objective": checkpoint_objective(ckpt)}
    ]


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(chunk):
    """The GPTModel inside a DDP wrapper: checkpoints hold the model's own key names."""
    return getattr(chunk, "module", chunk)


def _model_sharded_state_dict(chunks, keys: KeyFilter = None) -> Dict[str, Any]:
    out = {}
    for i, c in enumerate(chunks):
        sd = _unwrap(c).sharded_state_dict()
        out[_model_key(i, len(chunks))] = sd if keys is None else {k: v for k, v in sd.items() if keys(k)}
    return out


def _layout() -> Dict[str, int]:
    """Model-parallel shape of this job (RNG state is per (PP, TP) rank)."""
    from megatron.core import parallel_state as ps

    return {
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
    }


def _rng_sharded_object(is_loading: bool):
    """Per-rank RNG state (CPU, CUDA, megatron's tracker) as a ShardedObject."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = None
    if not is_loading:
        state = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        }
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    return ShardedObject(
        "rng_state", state, shape, (pp, tp), replica_id=ps.get_data_parallel_rank(with_context_parallel=True)
    )


def _prepare_optimizer_for_load(optimizer) -> None:
    """Make a fresh megatron-core distributed optimizer loadable on the torch-AdamW path.

    Without TransformerEngine/apex, megatron-core 0.16.1 uses torch's AdamW, which creates
    its state lazily at the first step, and keeps a per-parameter ``step`` tensor that the
    "fully_reshardable" format does not store (it stores ``step`` in the param groups).
    So: (1) allocate the state with megatron-core's own dummy-values initialiser at lr 0
    (every value is overwritten by the load), and (2) let the per-parameter copy skip
    ``step``, which ``load_state_dict`` has already restored from the param groups."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            continue
        groups = opt.optimizer.param_groups
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, lr in zip(groups, lrs):
            g["lr"] = lr

        original_set = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _opt=opt, _set=original_set):
            if "step" not in tensors:
                group_index, group_order = _opt.model_param_group_index_map[model_param]
                main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
                step = _opt.optimizer.state[main_param].get("step")
                if step is not None:
                    tensors = {**tensors, "step": step}  # copies onto itself: unchanged
            _set(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states


def _unshare_adam_steps(optimizer) -> None:
    """After a load, give every parameter its own ``step`` tensor.

    megatron-core 0.16.1 (torch-AdamW path) assigns one shared ``step`` tensor to all
    parameters; AdamW increments it in place per parameter, which would corrupt the bias
    correction from the second resumed step on."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _state_tensors(chunks, optimizer):
    """(name, tensor) of every model parameter and every optimizer tensor (fp32 main params,
    Adam moments) held by this rank."""
    for i, c in enumerate(chunks):
        for name, p in _unwrap(c).named_parameters():
            yield f"model{i}.{name}", p
    if optimizer is None:
        return
    for k, opt in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for g, group in enumerate(inner.param_groups):
            for j, p in enumerate(group["params"]):
                yield f"optimizer{k}.group{g}.param{j}", p
                for key, t in inner.state.get(p, {}).items():
                    if torch.is_tensor(t) and t.is_floating_point():
                        yield f"optimizer{k}.group{g}.param{j}.{key}", t


def count_nonfinite(chunks, optimizer) -> tuple:
    """Number of model/optimizer tensors holding NaN or Inf over all ranks (all ranks call,
    all get the total), and up to 5 of this rank's offending names (for the message)."""
    names, flags = [], []
    for name, t in _state_tensors(chunks, optimizer):
        names.append(name)
        flags.append(torch.isfinite(t.detach()).all())
    # One reduction for the lot: a per-tensor .item() would synchronise per tensor on GPU.
    bad_mask = ~torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool)
    total = bad_mask.sum().to(torch.int64).reshape(1)
    if torch.cuda.is_available():
        total = total.cuda()
    dist.all_reduce(total)
    bad_names = [n for n, b in zip(names, bad_mask.cpu().tolist()) if b][:5]
    return int(total.item()), bad_names


def prune_checkpoints(run_dir: str, keep: int, protect=()) -> List[Path]:
    """Delete complete checkpoints older than the newest ``keep`` (0 keeps all), never one in
    ``protect`` (e.g. the checkpoint this run started from); returns the deleted ones.

    Only complete checkpoints are counted and kept: a half-written ``.tmp`` never pushes a
    good checkpoint out, and since no non-finite state is ever written, the newest complete
    checkpoint is the newest good one."""
    if keep <= 0:
        return []
    protected = {Path(p).resolve() for p in protect if p is not None}
    doomed = [d for d in list_checkpoints(run_dir)[:-keep] if d.resolve() not in protected]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def checkpoints_after(run_dir: str, iteration: int) -> List[Path]:
    """Complete checkpoints in ``run_dir`` with an iteration above ``iteration``."""
    return [d for d in list_checkpoints(run_dir) if _iteration_of(d) > iteration]


def _iteration_of(ckpt: Path) -> int:
    m = _ITER_DIR.match(Path(ckpt).name)
    if m is None:
        raise ValueError(f"{ckpt} is not a checkpoint directory (iter_NNNNNNN)")
    return int(m.group(1))


def verify_checkpoint(ckpt: Path) -> None:
    """Check ``ckpt``'s files against its manifest (all ranks call); raise CorruptCheckpointError
    naming the file otherwise. A checkpoint from before manifests loads with a warning."""
    if verify_manifest(ckpt) == "no manifest" and dist.get_rank() == 0:
        log.warning("%s has no manifest (written by an older engine): its files are not verified", ckpt)


def select_resume_checkpoint(run_dir: str, fallback_on_corrupt: bool) -> Optional[Path]:
    """The newest complete checkpoint of ``run_dir`` that passes verification (all ranks call).

    A corrupt newest checkpoint raises CorruptCheckpointError, unless ``fallback_on_corrupt``:
    then it is renamed ``iter_N.corrupt`` (kept for inspection, out of the timeline, so the
    resumed run can write iteration N again) and the previous complete one is tried."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CorruptCheckpointError as exc:
            if not fallback_on_corrupt:
                raise CorruptCheckpointError(
                    f"{exc}. Set checkpoint.fallback_on_corrupt=true to resume from the previous "
                    "complete checkpoint instead"
                ) from None
            aside = ckpt.with_name(ckpt.name + ".corrupt")
            if dist.get_rank() == 0:
                log.warning("%s; falling back to the previous complete checkpoint, moving it to %s", exc, aside)
                if aside.exists():
                    shutil.rmtree(aside)
                ckpt.rename(aside)
            dist.barrier()
    return None


def save_checkpoint(
    run_dir: str,
    state: TrainState,
    chunks,
    optimizer,
    scheduler,
    config_yaml: str,
    save_optimizer: bool = True,
    keep: int = 0,
    protect=(),
    model_keys: KeyFilter = None,
    extra_meta: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write a complete checkpoint of ``state.iteration`` atomically; returns its path.

    Refuses (NonFiniteStateError) when a model or optimizer tensor is non-finite on any rank,
    and (CheckpointError) when a complete checkpoint of that iteration exists already. Files
    are written under ``iter_N.tmp``, then ``config.yaml``, the manifest, and ``engine_meta.json``
    (the completeness marker); then the rename, then retention (``prune_checkpoints`` with
    ``keep`` and ``protect``). ``model_keys`` selects the model state saved (default all);
    ``extra_meta`` is added to ``engine_meta.json`` (e.g. LoRA's base reference)."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(run_dir)
    final = root / f"iter_{state.iteration:07d}"
    tmp = root / f"iter_{state.iteration:07d}.tmp"
    rank = dist.get_rank()
    bad, names = count_nonfinite(chunks, optimizer if save_optimizer else None)
    if bad:
        raise NonFiniteStateError(
            f"refusing to write checkpoint {final}: {bad} model/optimizer tensor(s) hold NaN or Inf"
            + (f" (e.g. {', '.join(names)})" if names else "")
        )
    if (final / META).is_file():
        raise CheckpointError(f"refusing to overwrite the complete checkpoint {final}")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()

    sd = _model_sharded_state_dict(chunks, model_keys)
    if save_optimizer and optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=False, metadata=_SHARDING)
        sd["scheduler"] = scheduler.state_dict()
    sd["rng_state"] = _rng_sharded_object(is_loading=False)
    sd["train_state"] = asdict(state)
    dist_checkpointing.save(sd, str(tmp), content_metadata=_SHARDING)
    # A quantized (modelopt-converted) model: its modes, before the manifest covers them.
    modelopt_state.save([_unwrap(c) for c in chunks], tmp)
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
    dist.barrier()
    write_manifest(tmp)  # before engine_meta.json: a complete checkpoint always has one
    dist.barrier()

    if rank == 0:
        import yaml

        meta = {
            **asdict(state),
            "has_optimizer": bool(save_optimizer and optimizer is not None),
            "layout": _layout(),
            "format": "megatron-core dist_checkpointing",
            "objective": ((yaml.safe_load(config_yaml) or {}).get("objective") or {}).get("name"),
            **(extra_meta or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))  # its presence marks completeness
        if final.exists():  # an incomplete leftover (no META, checked above): not a checkpoint
            shutil.rmtree(final)
        tmp.rename(final)
        prune_checkpoints(run_dir, keep, protect)
    dist.barrier()
    return final


def load_checkpoint(
    ckpt: Path,
    chunks,
    optimizer=None,
    scheduler=None,
    load_optimizer: bool = True,
    verify: bool = True,
    model_keys: KeyFilter = None,
) -> TrainState:
    """Restore model (and optionally optimizer, scheduler, RNG, progress) from ``ckpt``,
    after verifying its files against its manifest (CorruptCheckpointError names the file).

    The checkpoint may come from any TP/PP/DP layout. With ``load_optimizer=False`` only the
    weights are read (a fresh optimizer picks them up) and a fresh TrainState is returned.
    ``model_keys`` selects the model state read (default all; the others keep their values).
    A LoRA adapter checkpoint (``lora_base`` in its metadata) holds only adapters: read in
    full it is refused with a hint to merge it first."""
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {META})")
    if verify:  # False only when the caller has just verified it (select_resume_checkpoint)
        verify_checkpoint(ckpt)  # a missing/truncated/altered file: one line naming it, on every rank
    meta = read_meta(ckpt)
    if model_keys is None and meta.get("lora_base"):
        raise CheckpointError(
            f"{ckpt} holds only LoRA adapters (base: {meta['lora_base'].get('path')}); fold them into a "
            "normal checkpoint first: python -m engine merge-lora CHECKPOINT OUT"
        )
    if modelopt_state.has_state(ckpt) and not modelopt_state.is_quantized(_unwrap(chunks[0])):
        # dist_checkpointing would load the weights and silently drop the quantizers.
        raise CheckpointError(
            f"{ckpt} holds a modelopt-quantized model: restore its modelopt state into the model "
            "before loading (engine.optimization.modelopt_state.restore; the trainer needs precision.qat)"
        )
    sd = _model_sharded_state_dict(chunks, model_keys)
    full = load_optimizer and optimizer is not None
    if full:
        if not meta.get("has_optimizer"):
            raise ValueError(f"{ckpt} was saved without optimizer state; it can only initialise weights")
        _prepare_optimizer_for_load(optimizer)
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True, metadata=_SHARDING)
        same_layout = meta.get("layout") == _layout()
        if same_layout:
            sd["rng_state"] = _rng_sharded_object(is_loading=True)
        elif dist.get_rank() == 0:
            log.warning(
                "checkpoint layout %s differs from this job's %s: RNG state not restored "
                "(weights, optimizer state and data position are)",
                meta.get("layout"),
                _layout(),
            )
    loaded = dist_checkpointing.load(sd, str(ckpt))
    for i, c in enumerate(chunks):
        part = loaded[_model_key(i, len(chunks))]
        if model_keys is None:
            _unwrap(c).load_state_dict(part)
            continue
        result = _unwrap(c).load_state_dict(part, strict=False)
        unread = [k for k in result.missing_keys if model_keys(k)]
        if unread or result.unexpected_keys:
            raise CheckpointError(f"{ckpt}: model state not loaded: {(unread + result.unexpected_keys)[:3]}")
    if not full:
        if optimizer is not None:
            optimizer.reload_model_params()  # fp32 master copies from the loaded weights
        return TrainState()
    optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    rng = loaded.get("rng_state") if same_layout else None
    if rng is not None:
        from megatron.core import tensor_parallel

        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return TrainState(**loaded["train_state"])
