"""Interpolating two checkpoints of the same architecture: linear and SLERP.

Both act tensor by tensor on the model parameters ``p = merge(a, b, t)``: ``t = 0`` gives
``a``, ``t = 1`` gives ``b``.

- ``linear``: ``(1 - t) a + t b``.
- ``slerp``: spherical interpolation as mergekit defines it (``mergekit/merge_methods/
  slerp.py``): each tensor is one flattened vector; with the normalised directions
  ``â = a/|a|``, ``b̂ = b/|b|`` and ``θ = arccos(â·b̂)``, the result is
  ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b`` (the *un-normalised* tensors, so norms are
  interpolated too), falling back to ``linear`` when ``|â·b̂| > 0.9995`` (nearly colinear:
  ``sin θ`` would divide by ~0). Norms below ``1e-8`` are not normalised (mergekit's eps).

The arithmetic is float64, rounded once to the tensor's dtype.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Tuple

import torch

from engine.config import ConfigError

Method = Literal["linear", "slerp"]
METHODS: Tuple[str, ...] = ("linear", "slerp")
DOT_THRESHOLD = 0.9995
"""mergekit's colinearity threshold: above it SLERP is linear interpolation."""
EPS = 1e-8
"""mergekit's normalisation epsilon."""


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 - t) a + t b`` in float64, returned in ``a``'s dtype."""
    return ((1.0 - t) * a.double() + t * b.double()).to(a.dtype)


def _normalized(v: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > EPS else v


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP of two same-shaped tensors (see the module docstring)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    dot = float((_normalized(a64) * _normalized(b64)).sum())
    if abs(dot) > DOT_THRESHOLD:
        return lerp(a, b, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin(theta - theta * t) / sin_theta
    s1 = math.sin(theta * t) / sin_theta
    return (s0 * a64 + s1 * b64).reshape(a.shape).to(a.dtype)


def interpolate(a: torch.Tensor, b: torch.Tensor, t: float, method: str) -> torch.Tensor:
    """``method`` (linear / slerp) between ``a`` (t = 0) and ``b`` (t = 1)."""
    if a.shape != b.shape:
        raise ConfigError(f"tensors of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be interpolated")
    if method == "linear":
        return lerp(a, b, t)
    if method == "slerp":
        return slerp(a, b, t)
    raise ConfigError(f"merge method '{method}' must be one of {', '.join(METHODS)}")


def check_merge(a: str, b: str, out: str, method: str, t: float) -> Tuple[Path, Path]:
    """The two checkpoints ``a`` and ``b`` name, once checked mergeable into the run directory
    ``out``: same architecture (``config_hash``), ``t`` in [0, 1], a known method, ``out``
    without checkpoints. ConfigError (one line) otherwise. Reads configs only."""
    from engine import checkpoint as ckpt_lib
    from engine.model_io import checkpoint_config, config_hash, resolve_checkpoint

    if method not in METHODS:
        raise ConfigError(f"merge method '{method}' must be one of {', '.join(METHODS)}")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"--t {t} must be within [0, 1] (0 gives A, 1 gives B)")
    ckpt_a, ckpt_b = resolve_checkpoint(a), resolve_checkpoint(b)
    if ckpt_lib.list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints; merge into a new run directory")
    hash_a, hash_b = config_hash(checkpoint_config(ckpt_a)), config_hash(checkpoint_config(ckpt_b))
    if hash_a != hash_b:
        raise ConfigError(
            f"{ckpt_a} and {ckpt_b} are different architectures (model config hash "
            f"{hash_a} vs {hash_b}); only checkpoints of the same model can be merged"
        )
    return ckpt_a, ckpt_b


def merge_checkpoints(a: str, b: str, out: str, method: str, t: float) -> Path:
    """Interpolate checkpoints (or runs' newest checkpoints) ``a`` and ``b`` into a weights-only
    checkpoint of the run directory ``out``; returns it. Its config is ``a``'s; its lineage is
    ``a``'s history followed by one entry naming both parents, the method and ``t``.

    Refused as :func:`check_merge` refuses. Memory: two copies of the model's weights."""
    from engine import checkpoint as ckpt_lib
    from engine.model_io import checkpoint_config, load_model, save_model_checkpoint
    from models.build import resolve_dtype

    ckpt_a, ckpt_b = check_merge(a, b, out, method, t)
    cfg_a = checkpoint_config(ckpt_a)
    # The parameters keep the dtype the run trained them in (the interpolation is float64).
    loaded = load_model(ckpt_a, resolve_dtype(cfg_a.precision.dtype))
    params_a = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    # B is read into the same modules (A's copy kept aside): two copies of the weights, not three.
    ckpt_lib.load_checkpoint(ckpt_b, loaded.chunks, optimizer=None, load_optimizer=False)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            p.copy_(interpolate(params_a[name], p.detach(), t, method))
    del params_a
    lineage = ckpt_lib.read_lineage(ckpt_a)
    lineage.append(
        {
            "init_from": str(ckpt_b),
            "iteration": ckpt_lib.read_meta(ckpt_b).get("iteration"),
            "objective": "merge",
            "merge": {"method": method, "t": t, "parents": [str(ckpt_a), str(ckpt_b)]},
            "parent_b_lineage": ckpt_lib.read_lineage(ckpt_b),
        }
    )
    return save_model_checkpoint(out, loaded.cfg, loaded.chunks, iteration=0, lineage=lineage)
