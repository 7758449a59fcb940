"""The ``performance`` switches compute what the unoptimised path computes.

Each switch is trained for 5 steps of ``tiny-llama`` (mock data, seed fixed) next to the
baseline with every switch off, in one process (``examples/bench_gpu.py _variants``: the
same runner the GPU benchmark checks its kernels with; ``Trainer`` rebuilt per variant),
and the per-step loss and gradient norm are compared. The oracle is the unoptimised path:
megatron-core's unfused bias/activation/dropout-add and vocab-parallel cross entropy, and
torch's single-tensor AdamW. The fused cross entropy rounds the logits' gradient to bf16
(megatron-core's native implementation), so it is compared in bf16, where the unfused path
keeps bf16 gradients too.

Tolerance: relative 2e-5 on the loss, 2e-4 on the gradient norm. In fp32 one rounding is
6e-8 relative; a fused kernel reorders the sums of a layer (hundreds of terms) and uses its
own backward formula, which moves the gradient norm by ~1e-6, and the updated weights carry
that through 5 steps. An error such as bf16-rounded logit gradients in an fp32 run moves it
by 1e-3 after two steps (measured: why the fused cross entropy is refused outside bf16).
Each variant also reports that its switch took effect, so a switch that silently did
nothing cannot pass.

The default test runs megatron-core's ``jit_fuser`` functions eagerly (TORCHDYNAMO_DISABLE:
inductor's C++ compile takes ~40 s on CPU); the slow test compiles them and the layers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import ConfigError, PerformanceConfig
from models.presets import get_preset
from tests.conftest import REPO

OFF = [
    "performance.bias_activation_fusion=false",
    "performance.bias_dropout_fusion=false",
    "performance.cross_entropy_fusion=false",
    "performance.adam=for_loop",
]
LOSS_RTOL, GRAD_RTOL = 2e-5, 2e-4


def _run_variants(tmp_path: Path, variants: dict, dynamo: bool, timeout: int = 240) -> dict:
    cfg = {
        "model": {"preset": "tiny-llama"},
        "data": {"mock": True, "seq_length": 64},
        "training": {"steps": 5, "global_batch_size": 4, "micro_batch_size": 2},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "weight_decay": 0.1},
        "precision": {"dtype": "fp32"},
        "logging": {"interval": 1, "tensorboard": False},
        "checkpoint": {"dir": str(tmp_path / "run"), "enabled": False, "lock": False},
    }
    cfg_path, out = tmp_path / "config.yaml", tmp_path / "results.json"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    if not dynamo:
        env["TORCHDYNAMO_DISABLE"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "bench_gpu.py"),
            "_variants",
            str(cfg_path),
            json.dumps(variants),
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in results.items() if k != "_device" and "error" in v}
    assert not errors, errors
    return results


def _assert_matches(base: list, other: list, name: str) -> None:
    assert len(base) == len(other) == 5, name
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(base, other), start=1):
        assert math.isclose(l0, l1, rel_tol=LOSS_RTOL), f"{name} step {step}: loss {l1} vs {l0}"
        assert math.isclose(g0, g1, rel_tol=GRAD_RTOL), f"{name} step {step}: grad norm {g1} vs {g0}"


def test_each_switch_matches_the_unoptimised_path_over_five_steps(tmp_path):
    variants = {
        "baseline": OFF,
        "bias_activation": OFF + ["performance.bias_activation_fusion=true"],
        "bias_dropout_add": OFF + ["performance.bias_dropout_fusion=true"],
        "adam_foreach": OFF + ["performance.adam=foreach"],
        "adam_fused": OFF + ["performance.adam=fused"],
        "baseline_bf16": OFF + ["precision.dtype=bf16"],
        "cross_entropy_bf16": OFF + ["precision.dtype=bf16", "performance.cross_entropy_fusion=true"],
    }
    res = _run_variants(tmp_path, variants, dynamo=False)
    base = res["baseline"]
    switches = (
        "bias_activation_fusion",
        "bias_dropout_fusion",
        "cross_entropy_loss_fusion",
        "adam_fused",
        "adam_foreach",
    )
    assert not any(base["flags"][k] for k in switches) and base["flags"]["compiled_layers"] == 0
    expect = {
        "bias_activation": "bias_activation_fusion",
        "bias_dropout_add": "bias_dropout_fusion",
        "adam_foreach": "adam_foreach",
        "adam_fused": "adam_fused",
        "cross_entropy_bf16": "cross_entropy_loss_fusion",
    }
    for name, flag in expect.items():
        assert res[name]["flags"][flag], f"{name}: {flag} did not take effect: {res[name]['flags']}"
        others = [k for k in switches if k != flag]
        assert not any(res[name]["flags"][k] for k in others), f"{name}: other switches on: {res[name]['flags']}"
        reference = res["baseline_bf16" if name.endswith("_bf16") else "baseline"]
        _assert_matches(reference["steps"], res[name]["steps"], name)
    # The run learns: equal losses are not those of a frozen model.
    assert base["steps"][-1][0] < base["steps"][0][0]


@pytest.mark.slow
def test_compiled_fusions_and_layers_match_the_unoptimised_path(tmp_path):
    """megatron-core's jit fusions through torch.compile (inductor) and compiled layers."""
    variants = {
        "baseline": OFF,
        "compiled": [
            "performance.bias_activation_fusion=true",
            "performance.bias_dropout_fusion=true",
            "performance.adam=fused",
            "performance.compile_layers=true",
        ],
    }
    res = _run_variants(tmp_path, variants, dynamo=True, timeout=900)
    assert (
        res["compiled"]["flags"]["compiled_layers"] == get_preset("tiny-llama").num_layers
        and res["compiled"]["flags"]["adam_fused"]
    )
    _assert_matches(res["baseline"]["steps"], res["compiled"]["steps"], "compiled")


def test_auto_resolution_on_cpu_and_cuda():
    from models.performance import adam_implementation, fusion_kwargs, switch_on

    perf = PerformanceConfig()
    assert switch_on(None, on_cpu=True) is False and switch_on(None, on_cpu=False) is True
    assert switch_on(False, on_cpu=False) is False and switch_on(True, on_cpu=True) is True
    on_gpu = fusion_kwargs(perf, on_cpu=False, bias_activation_possible=False, dtype=torch.bfloat16)
    # megatron-core refuses bias_activation_fusion for an activation it cannot fuse.
    assert on_gpu["bias_activation_fusion"] is False and on_gpu["bias_dropout_fusion"] is True
    assert on_gpu["cross_entropy_loss_fusion"] is True and on_gpu["cross_entropy_fusion_impl"] == "native"
    # auto keeps the bf16-rounding fused cross entropy away from fp32/fp16; asking for it is refused
    assert fusion_kwargs(perf, False, True, torch.float32)["cross_entropy_loss_fusion"] is False
    with pytest.raises(ConfigError, match="cross_entropy_fusion needs bf16"):
        fusion_kwargs(PerformanceConfig(cross_entropy_fusion=True), False, True, torch.float16)
    assert adam_implementation(perf, on_cuda=True) == "fused" and adam_implementation(perf, on_cuda=False) == "for_loop"


def test_sdpa_backend_on_cpu_is_torch_default_and_context_runs():
    from models.performance import sdpa_backend_order, sdpa_context

    order, note = sdpa_backend_order(PerformanceConfig(sdpa_backend="cudnn"), 16, 4, 2, torch.float32)
    assert order is None and "CPU" in note
    assert sdpa_context(None) is None
    q = torch.randn(1, 2, 8, 4)
    with sdpa_context(["math", "flash"]):  # math runs on CPU; the priority list is accepted
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_liger_rmsnorm_refused_without_liger_or_cuda():
    from models.performance import liger_available, rms_norm_class

    assert rms_norm_class(PerformanceConfig()) is None
    with pytest.raises(ConfigError, match="liger"):
        rms_norm_class(PerformanceConfig(rmsnorm="liger"))
    assert not liger_available() or not torch.cuda.is_available()


def test_bad_switch_values_are_config_errors():
    from engine.run_config import load_run_config

    with pytest.raises(ConfigError, match="performance.adam"):
        load_run_config(None, ["performance.adam=apex"])
    with pytest.raises(ConfigError, match="performance.bias_dropout_fusion"):
        load_run_config(None, ["performance.bias_dropout_fusion=sometimes"])


def test_sdpa_backend_order_prefers_cudnn_on_hopper_and_falls_back_when_refused(monkeypatch):
    """The GPU-only selection logic, with the device and the kernel probe stood in for."""
    from models import performance as perf_lib

    refused = {"cudnn"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(perf_lib, "_probe", lambda b, *a: "No available kernel" if b in refused else None)
    order, note = perf_lib.sdpa_backend_order(PerformanceConfig(), 128, 24, 8, torch.bfloat16)
    assert order == ["flash", "efficient", "cudnn", "math"] and "cudnn refused: No available kernel" in note
    refused.clear()
    order, note = perf_lib.sdpa_backend_order(PerformanceConfig(), 128, 24, 8, torch.bfloat16)
    assert order == ["cudnn", "flash", "efficient", "math"] and "cudnn first" in note
    order, _ = perf_lib.sdpa_backend_order(PerformanceConfig(sdpa_backend="efficient"), 128, 24, 8, torch.bfloat16)
    assert order == ["efficient", "flash", "cudnn", "math"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100: torch's own order
    assert perf_lib.sdpa_backend_order(PerformanceConfig(), 128, 24, 8, torch.bfloat16)[0] is None
    refused.update({"cudnn", "flash", "efficient", "math"})
    with pytest.raises(ConfigError, match="no SDPA backend runs head_dim 128"):
        perf_lib.sdpa_backend_order(PerformanceConfig(sdpa_backend="flash"), 128, 24, 8, torch.bfloat16)
    monkeypatch.undo()
    # Every name maps to a torch backend: the context enters and SDPA runs on CPU under it.
    q = torch.randn(1, 2, 8, 4)
    with perf_lib.sdpa_context(["cudnn", "flash", "efficient", "math"]):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_liger_rmsnorm_is_wired_into_the_spec_with_megatrons_constructor(monkeypatch):
    """liger-kernel stood in for by a module with its class name and signature (it is not
    installed here and needs CUDA): the spec takes it for both layer norms, megatron-core's
    ``build_module`` call builds it, and the weight keeps the name ``weight``."""
    import types

    from megatron.core.transformer.spec_utils import build_module

    from models.specs import layer_spec

    class LigerRMSNorm(torch.nn.RMSNorm):
        def __init__(self, hidden_size, eps=1e-6):
            super().__init__(hidden_size, eps=eps)

    fake = types.ModuleType("liger_kernel.transformers.rms_norm")
    fake.LigerRMSNorm = LigerRMSNorm  # type: ignore[attr-defined]
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rms_norm", fake)
    monkeypatch.setattr("models.performance.liger_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    perf = PerformanceConfig(rmsnorm="liger", sdpa_backend="default")
    spec, description = layer_spec(get_preset("tiny-llama"), use_te=False, performance=perf)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "liger-kernel RMSNorm" in description
    norm = build_module(spec.submodules.input_layernorm, config=None, hidden_size=64, eps=1e-5)
    assert isinstance(norm, LigerRMSNorm) and norm.eps == 1e-5 and [n for n, _ in norm.named_parameters()] == ["weight"]
    assert spec.submodules.pre_mlp_layernorm is spec.submodules.input_layernorm
    with pytest.raises(ConfigError, match="needs CUDA"):
        layer_spec(get_preset("tiny-llama"), use_te=False, performance=perf)
