"""Reference log-probabilities for DPO: one forward-only pass, stored next to the dataset.

The file ``<prefix>_reflogps_<tag>.npy`` holds ``[pairs, 2]`` float64 sums of response
log-probabilities (chosen, rejected) by pair index, with a ``.json`` note of the reference
checkpoint; ``tag`` hashes the reference checkpoint, its iteration and the sequence length,
so a different reference never reuses stale values. The pass runs the policy's own
``forward_step`` and megatron-core schedule over every pair of the dataset (any TP/PP/DP
layout; data-parallel ranks take interleaved slices, results are gathered), with the
reference weights loaded into the policy model. When the reference is not the
``checkpoint.init_from`` weights the run loads it first and the init weights after.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine import checkpoint as ckpt_lib
from engine.config import ConfigError
from engine.metrics import print_rank0


def reference_file(prefix: str, ref_ckpt: Path, seq_length: int) -> Path:
    """Where the reference log-probs of ``prefix`` under ``ref_ckpt`` are stored."""
    meta = ckpt_lib.read_meta(ref_ckpt)
    key = f"{Path(ref_ckpt).resolve()}|{meta.get('iteration')}|{seq_length}"
    return Path(f"{prefix}_reflogps_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy")


def load_or_compute_reference(trainer, objective) -> np.ndarray:
    """The ``[pairs, 2]`` reference log-prob sums of the run's preference dataset."""
    from engine.data.chat_data import ChatIndexed
    from engine.data.preference_data import PreferenceDataset
    from engine.data.gpt_data import token_ids

    cfg = trainer.cfg
    ref = cfg.objective.reference or cfg.checkpoint.init_from
    if not ref:
        raise ConfigError("objective dpo needs a reference: set objective.reference or checkpoint.init_from")
    ref = Path(ref)
    prefix = cfg.data.paths[0]
    path = reference_file(prefix, ref, cfg.data.seq_length)
    if path.exists():
        values = np.load(path)
        print_rank0(f"dpo: reference log-probs of {len(values)} pairs from {path}")
        return values
    weights_are_reference = (trainer.state.iteration == 0 and cfg.checkpoint.init_from
                             and Path(cfg.checkpoint.init_from).resolve() == ref.resolve())
    if trainer.state.iteration > 0 and not weights_are_reference:
        raise ConfigError(f"{path} (reference log-probs) is missing and the model has already trained; "
                          f"recompute it with a fresh run initialised from {ref}")
    if not weights_are_reference:
        if not cfg.checkpoint.init_from:
            raise ConfigError("objective.reference differs from the policy's weights: give checkpoint.init_from "
                              "so the policy can be restored after the reference pass")
        ckpt_lib.load_checkpoint(ref, trainer.model, None, load_optimizer=False)

    data = ChatIndexed(prefix, "preference")
    n = data.num_docs
    gbs = cfg.training.global_batch_size
    total = int(math.ceil(n / gbs)) * gbs
    ordered = PreferenceDataset(data, 0, n, cfg.data.seq_length, total, cfg.data.seed, token_ids(cfg).eod,
                                shuffle=False)
    its = trainer._iterators(ordered, total, 0)
    for m in trainer.model:
        m.eval()
    objective.start_collecting()
    with torch.no_grad():
        for _ in range(total // gbs):
            trainer._forward_backward(its, forward_only=True)
    local = objective.stop_collecting()
    for m in trainer.model:
        m.train()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    values = np.full((n, 2), np.nan, dtype=np.float64)
    for part in gathered:
        for idx, sums in part or []:
            values[idx] = sums
    if np.isnan(values).any():
        raise RuntimeError(f"reference pass left {int(np.isnan(values).any(axis=1).sum())} pairs without values")
    if dist.get_rank() == 0:
        tmp = path.with_name(path.name + ".partial.npy")
        np.save(tmp, values)
        os.replace(tmp, path)
        Path(str(path)[:-4] + ".json").write_text(json.dumps(
            {"reference": str(ref.resolve()), "pairs": n, "seq_length": cfg.data.seq_length,
             "layout": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline}}, indent=2))
    dist.barrier()
    print_rank0(f"dpo: computed reference log-probs of {n} pairs with {ref} -> {path}")
    if not weights_are_reference:
        ckpt_lib.load_checkpoint(Path(cfg.checkpoint.init_from), trainer.model, trainer.optimizer,
                                 load_optimizer=False)
    return values
