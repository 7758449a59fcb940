"""Reference log-probabilities for DPO: one forward-only pass, stored in a cache keyed on content.

The file ``<cache>/<name>_reflogps_<key>.npy`` holds ``[pairs, 2]`` float64 sums of response
log-probabilities (chosen, rejected) by pair index, with a ``.json`` note of what it was
computed from. ``key`` hashes everything the values depend on (:func:`reference_key`): the
bytes of the preference data (tokens and loss masks, ``.bin`` and ``.idx``), the reference
checkpoint's weights (its manifest of per-file CRCs, or its files' bytes when it has none),
the sequence length, chat template, pad id and dtype. Rewriting the data under the same
prefix or retraining the reference in place therefore recomputes instead of reusing stale
values. ``<cache>`` is ``objective.dpo.reference_cache_dir``, or the dataset's directory when
writable, else ``<checkpoint.dir>/reference_cache`` (decided before the pass, so a read-only
data directory never costs a reference pass that cannot be stored).

The pass is the trainer's public ``forward_only`` (the policy's own ``forward_step`` and
megatron-core schedule) over every pair of the dataset (any TP/PP/DP layout; data-parallel
ranks take interleaved slices, results are gathered), with the reference weights loaded into
the policy model by ``trainer.load_weights``. When the reference is
not the ``checkpoint.init_from`` weights the run loads it first and the init weights after.

With LoRA (``finetune.lora``) the reference is the frozen base model, ``checkpoint.init_from``
(a different ``objective.dpo.reference`` is refused by the config check): the pass runs with
the adapters bypassed (``adapters_disabled``), so it gives the base model's log-probs at any
iteration, also when a resumed run has to recompute them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
import torch.distributed as dist

from engine import checkpoint as ckpt_lib
from engine.ckpt_manifest import MANIFEST
from engine.config import Config, ConfigError
from engine.data.chat_data import ChatIndexed, mask_prefix
from engine.data.gpt_data import token_ids
from engine.data.preference_data import PreferenceDataset
from engine.metrics import print_rank0
from engine.optimization.lora import adapters_disabled

if TYPE_CHECKING:  # the trainer imports the objectives; only the annotations name it
    from engine.objectives.dpo import DPOObjective, PairLogps
    from engine.trainer import Trainer

_CHUNK = 8 << 20  # 8 MiB reads


def _hash_file(h, path: Path) -> None:
    """Feed ``path``'s name, size and bytes to the hash ``h``."""
    h.update(f"{path.name}|{path.stat().st_size}|".encode())
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return
            h.update(block)


def data_fingerprint(prefix: str) -> str:
    """Hash of the bytes of a preference dataset: tokens and loss masks, ``.bin`` and ``.idx``."""
    h = hashlib.blake2b(digest_size=16)
    for p in (prefix, mask_prefix(prefix)):
        for ext in (".idx", ".bin"):
            _hash_file(h, Path(p + ext))
    return h.hexdigest()


def weights_fingerprint(ckpt: Path) -> str:
    """Hash of a checkpoint's content: its manifest (size and CRC-32 of every file) when it has
    one, else the bytes of its files (sizes and mtimes would miss a same-size rewrite)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ConfigError(f"dpo reference checkpoint {ckpt} does not exist")
    h = hashlib.blake2b(digest_size=16)
    manifest = ckpt / MANIFEST
    if manifest.is_file():
        h.update(json.dumps(json.loads(manifest.read_text())["files"], sort_keys=True).encode())
        return "manifest:" + h.hexdigest()
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != ckpt_lib.META):
        h.update(str(path.relative_to(ckpt)).encode())
        _hash_file(h, path)
    return "files:" + h.hexdigest()


def reference_key(cfg: Config, prefix: str, ref_ckpt: Path, pad_id: int) -> dict:
    """Everything the stored reference log-probs depend on (hashed into the file name)."""
    return {
        "data": data_fingerprint(prefix),
        "reference": weights_fingerprint(ref_ckpt),
        "seq_length": cfg.data.seq_length,
        "chat_template": cfg.data.chat_template,
        "pad_id": int(pad_id),
        "dtype": cfg.precision.dtype,
    }


def _writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (made if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def cache_dirs(cfg: Config, prefix: str) -> List[Path]:
    """Directories searched for stored values, the first writable one is where new ones go:
    ``objective.dpo.reference_cache_dir`` alone when set, else the dataset's directory then
    ``<checkpoint.dir>/reference_cache``."""
    if cfg.objective.dpo.reference_cache_dir:
        return [Path(cfg.objective.dpo.reference_cache_dir)]
    return [Path(prefix).resolve().parent, Path(cfg.checkpoint.dir) / "reference_cache"]


def reference_file(cache_dir: Path, prefix: str, key: dict) -> Path:
    """Where the reference log-probs of ``prefix`` under ``key`` are stored in ``cache_dir``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{Path(prefix).name}_reflogps_{digest}.npy"


def _locate(cfg: Config, prefix: str, key: dict):
    """(an existing file or None, the file new values go to or None when no directory is writable)."""
    dirs = cache_dirs(cfg, prefix)
    for d in dirs:
        if reference_file(d, prefix, key).is_file():
            return reference_file(d, prefix, key), None
    for d in dirs:
        if _writable(d):
            return None, reference_file(d, prefix, key)
    return None, None


def _on_rank0(fn):
    """``fn()`` on rank 0 (hashing reads every byte once, not once per rank), broadcast to all;
    an exception there is raised on every rank rather than leaving the others waiting."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, fn())]
        except Exception as exc:  # re-raised below, on every rank
            box = [(False, exc)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def load_or_compute_reference(trainer: "Trainer", objective: "DPOObjective") -> np.ndarray:
    """The ``[pairs, 2]`` reference log-prob sums of the run's preference dataset."""
    cfg = trainer.cfg
    ref_setting = cfg.objective.dpo.reference or cfg.checkpoint.init_from
    if not ref_setting:
        raise ConfigError("objective dpo needs a reference: set objective.dpo.reference or checkpoint.init_from")
    ref = Path(ref_setting)
    prefix = cfg.data.paths[0]
    pad = token_ids(cfg).eod
    key = _on_rank0(lambda: reference_key(cfg, prefix, ref, pad))
    found, path = _on_rank0(lambda: _locate(cfg, prefix, key))
    if found is not None:
        values = np.load(found)
        print_rank0(f"dpo: reference log-probs of {len(values)} pairs from {found}")
        return values
    if path is None:
        where = " nor ".join(str(d) for d in cache_dirs(cfg, prefix))
        raise ConfigError(
            f"dpo: cannot store reference log-probs: {where} is not writable; "
            f"set objective.dpo.reference_cache_dir to a writable directory"
        )
    lora = trainer.lora is not None  # the frozen base is in the model: bypass the adapters
    weights_are_reference = lora or (
        trainer.state.iteration == 0
        and cfg.checkpoint.init_from
        and Path(cfg.checkpoint.init_from).resolve() == ref.resolve()
    )
    if trainer.state.iteration > 0 and not weights_are_reference:
        raise ConfigError(
            f"{path} (reference log-probs of this data and reference) is missing and the model "
            f"has already trained; recompute it with a fresh run initialised from {ref}"
        )
    if not weights_are_reference:
        if not cfg.checkpoint.init_from:
            raise ConfigError(
                "objective.dpo.reference differs from the policy's weights: give checkpoint.init_from "
                "so the policy can be restored after the reference pass"
            )
        trainer.load_weights(ref)

    data = ChatIndexed(prefix, "preference")
    n = data.num_docs
    gbs = cfg.training.global_batch_size
    total = int(math.ceil(n / gbs)) * gbs
    ordered = PreferenceDataset(data, 0, n, cfg.data.seq_length, total, cfg.data.seed, pad, shuffle=False)
    objective.start_collecting()
    try:
        with adapters_disabled(trainer.model) if lora else contextlib.nullcontext():
            trainer.forward_only(ordered, total)
    finally:
        local = objective.stop_collecting()
    gathered: List[Optional[List[PairLogps]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    values = np.full((n, 2), np.nan, dtype=np.float64)
    for part in gathered:
        for idx, sums in part or []:
            values[idx] = sums
    if np.isnan(values).any():
        raise RuntimeError(f"reference pass left {int(np.isnan(values).any(axis=1).sum())} pairs without values")
    if dist.get_rank() == 0:
        _store(
            path,
            values,
            {
                "prefix": str(Path(prefix).resolve()),
                "reference": str(ref.resolve()),
                "pairs": n,
                "key": key,
                "layout": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline},
            },
        )
    dist.barrier()
    print_rank0(f"dpo: computed reference log-probs of {n} pairs with {ref} -> {path}")
    if not weights_are_reference:
        trainer.load_weights(cfg.checkpoint.init_from)
    return values


def _store(path: Path, values: np.ndarray, note: dict) -> None:
    """Write the values (atomically: a partial file never has the final name) and their note."""
    tmp = path.with_name(path.name + ".partial.npy")
    np.save(tmp, values)
    os.replace(tmp, path)
    Path(str(path)[:-4] + ".json").write_text(json.dumps(note, indent=2))
