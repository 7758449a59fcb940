"""The pinned dependency set: pyproject.toml pins what the engine relies on, the constraints
file (the exact set CI ran) satisfies pyproject's bounds, and the environment under test is
that set."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _project():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements():
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    return reqs


def _constraints():
    pins = {}
    for line in (REPO / "constraints" / "py311.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_megatron_core_is_pinned_to_the_version_whose_internals_the_engine_uses():
    deps = {Requirement(r).name: Requirement(r) for r in _project()["dependencies"]}
    assert str(deps["megatron-core"].specifier) == "==0.16.1"
    assert metadata.version("megatron-core") == "0.16.1"
    # APIs that move between releases are upper-bounded.
    for name in ("torch", "transformers", "gguf"):
        assert any(s.operator == "<" for s in deps[name].specifier), name
    # modelopt's megatron plugins follow megatron-core's internals release by release.
    opt = {Requirement(r).name: Requirement(r) for r in _project()["optional-dependencies"]["opt"]}
    assert str(opt["nvidia-modelopt"].specifier) == "==0.42.0"


def test_constraints_satisfy_pyproject_bounds():
    pins = _constraints()
    for req in _requirements():
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key == "torch":
            continue  # installed by setup_env.sh itself (CPU wheel, or a CUDA build already present)
        assert key in pins, f"{req.name} is a dependency but not in constraints/py311.txt"
        assert req.specifier.contains(pins[key], prereleases=True), (
            f"constraints/py311.txt pins {req.name}=={pins[key]}, outside pyproject's {req.specifier}"
        )


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the constraints record the Python 3.11 (CI) set")
def test_environment_is_the_constrained_set():
    pins = _constraints()
    differ, seen = [], set()
    for dist in metadata.distributions():  # in sys.path order: the first one is what imports
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in seen:
            continue
        seen.add(key)
        if key in pins and dist.version != pins[key]:
            differ.append(f"{key} {dist.version} (constraints: {pins[key]})")
    assert not differ, "installed versions differ from constraints/py311.txt: " + ", ".join(differ)
