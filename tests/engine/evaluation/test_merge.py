"""Linear and SLERP interpolation of tensors and of whole checkpoints."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import yaml

from engine.config import ConfigError
from engine.evaluation.merge import interpolate, lerp, merge_checkpoints, slerp
from engine.model_io import checkpoint_config, config_hash


def mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit's published SLERP (merge_methods/slerp.py), in numpy float64: the oracle."""
    c0, c1 = np.array(v0, np.float64), np.array(v1, np.float64)
    n0 = c0 / np.linalg.norm(c0) if np.linalg.norm(c0) > eps else c0
    n1 = c1 / np.linalg.norm(c1) if np.linalg.norm(c1) > eps else c1
    dot = np.sum(n0 * n1)
    if np.abs(dot) > dot_threshold:
        return (1 - t) * c0 + t * c1
    theta_0 = np.arccos(dot)
    theta_t = theta_0 * t
    return np.sin(theta_0 - theta_t) / np.sin(theta_0) * c0 + np.sin(theta_t) / np.sin(theta_0) * c1


@pytest.fixture
def pair():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)


def test_slerp_endpoints_return_the_inputs(pair):
    a, b = pair
    assert torch.equal(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-6)
    assert slerp(a, b, 0.3).dtype == a.dtype and slerp(a, b, 0.3).shape == a.shape


def test_slerp_of_identical_inputs_is_unchanged(pair):
    a, _ = pair
    assert torch.equal(slerp(a, a.clone(), 0.5), a)
    bf = a.to(torch.bfloat16)
    assert torch.equal(slerp(bf, bf.clone(), 0.5), bf)


def test_slerp_hand_computed_two_vectors():
    # |a| = 2, |b| = 1, orthogonal: theta = pi/2, t = 1/3 ->
    # sin(pi/3)/1 * a + sin(pi/6)/1 * b = (sqrt(3), 1/2)
    out = slerp(torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), 1 / 3)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(3), 0.5], dtype=torch.float64), rtol=0, atol=1e-12)
    # unit vectors at 90 degrees, halfway: (sqrt(2)/2, sqrt(2)/2), norm kept at 1
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5)] * 2), rtol=0, atol=1e-7)


def test_slerp_matches_mergekit_and_falls_back_to_linear_when_colinear(pair):
    a, b = pair
    for t in (0.1, 0.5, 0.9):
        expected = mergekit_slerp(t, a.numpy(), b.numpy())
        np.testing.assert_allclose(slerp(a, b, t).numpy(), expected, rtol=1e-6, atol=1e-6)
    near = a * 2.0 + 1e-4 * b  # nearly colinear: linear interpolation, as mergekit
    torch.testing.assert_close(slerp(a, near, 0.25), 0.75 * a + 0.25 * near)
    opposite = -a  # antiparallel: |dot| = 1, linear too
    torch.testing.assert_close(slerp(a, opposite, 0.5), torch.zeros_like(a))


def test_linear(pair):
    a, b = pair
    torch.testing.assert_close(lerp(a, b, 0.1), 0.9 * a + 0.1 * b)
    assert torch.equal(lerp(a, b, 0.0), a) and torch.equal(lerp(a, b, 1.0), b)
    torch.testing.assert_close(lerp(torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0]), 0.25), torch.tensor([1.0, 3.0]))
    with pytest.raises(ConfigError, match="shapes"):
        interpolate(a, b[:3], 0.5, "linear")
    with pytest.raises(ConfigError, match="method"):
        interpolate(a, b, 0.5, "ties")


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_merge_checkpoints(two_checkpoints, tmp_path, method):
    from engine import checkpoint as ckpt_lib
    from engine.model_io import load_model

    _, first, second = two_checkpoints
    t = 0.3
    merged = merge_checkpoints(str(first), str(second), str(tmp_path / "merged"), method, t)
    pa = {k: v.clone() for k, v in load_model(first).model.named_parameters()}
    pb = {k: v.clone() for k, v in load_model(second).model.named_parameters()}
    out = dict(load_model(tmp_path / "merged").model.named_parameters())
    assert set(out) == set(pa)
    for name, p in out.items():
        a, b = pa[name].detach().double().numpy(), pb[name].detach().double().numpy()
        expected = (
            (1 - t) * a + t * b if method == "linear" else mergekit_slerp(t, a.ravel(), b.ravel()).reshape(a.shape)
        )
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=name)
    lineage = ckpt_lib.read_meta(merged)["lineage"]
    assert lineage[-2]["init_from"] == str(first)
    assert lineage[-1]["init_from"] == str(second)
    assert lineage[-1]["merge"] == {"method": method, "t": t, "parents": [str(first), str(second)]}


def test_merge_refuses_bad_input(two_checkpoints, tmp_path, capsys):
    from engine.cli import main

    _, first, second = two_checkpoints
    other = tmp_path / "other" / "checkpoints" / first.name
    shutil.copytree(first, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["num_layers"] += 1
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="different architectures"):
        merge_checkpoints(str(first), str(other), str(tmp_path / "m1"), "slerp", 0.1)
    with pytest.raises(ConfigError, match="within"):
        merge_checkpoints(str(first), str(second), str(tmp_path / "m2"), "slerp", 1.5)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()
    # The command: exit 2 and one line naming the problem, before any model is built.
    assert main(["merge", str(first), str(other), str(tmp_path / "m3"), "--t", "0.1"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"config error: {first} and {other} are different architectures (model config hash "
        f"{config_hash(checkpoint_config(first))} vs {config_hash(checkpoint_config(other))}); "
        "only checkpoints of the same model can be merged"
    ]
    assert not (tmp_path / "m3").exists()
