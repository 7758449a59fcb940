"""FP8/MXFP8 precision: recipe selection, refusals, alignment and megatron-core fields (on CPU)."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError
from engine.precision import PrecisionError, check_fp8_config, mfu_precision, resolve_fp8, select_recipe
from engine.run_config import load_run_config, validate_run

BLACKWELL, HOPPER, ADA, AMPERE = (10, 0), (9, 0), (8, 9), (8, 0)


def fp8_cfg(*overrides):
    return load_run_config(
        None,
        [
            "model.preset=frankenstallm-3b",
            "data.mock=true",
            "data.seq_length=4096",
            "training.global_batch_size=8",
            "precision.dtype=fp8",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    "capability,te,expected",
    [
        (BLACKWELL, "2.8.0", "mxfp8"),
        (HOPPER, "2.8.0", "tensorwise"),
        (HOPPER, "2.1.0", "delayed"),  # current scaling arrived in TE 2.2
        (ADA, "1.13.0", "delayed"),
    ],
)
def test_auto_picks_the_recipe_for_the_gpu(capability, te, expected):
    assert select_recipe("auto", capability, te) == expected


@pytest.mark.parametrize(
    "requested,capability,te,message",
    [
        ("mxfp8", HOPPER, "2.8.0", "needs a Blackwell data-center GPU (compute capability 10.x); this GPU is 9.0"),
        ("auto", AMPERE, "2.8.0", "FP8 needs compute capability >= 8.9"),
        ("tensorwise", None, "2.8.0", "needs a CUDA GPU"),
        ("auto", BLACKWELL, None, "needs TransformerEngine, which is not installed"),
        ("blockwise", HOPPER, "2.2.0", "blockwise needs TransformerEngine >= 2.3"),
    ],
)
def test_impossible_requests_are_clear_errors(requested, capability, te, message):
    with pytest.raises(PrecisionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_recipe(requested, capability, te)


def test_resolve_sets_megatron_core_fields():
    cfg = fp8_cfg("precision.first_last_layers_bf16=true", "precision.num_layers_at_end_in_bf16=2")
    fp8 = resolve_fp8(cfg, capability=BLACKWELL, te_version="2.8.0")
    kw = fp8.transformer_kwargs()
    assert kw == {
        "fp8": "e4m3",
        "fp8_recipe": "mxfp8",
        "fp8_param": False,
        "first_last_layers_bf16": True,
        "num_layers_at_start_in_bf16": 1,
        "num_layers_at_end_in_bf16": 2,
    }
    assert resolve_fp8(fp8_cfg(), capability=HOPPER, te_version="2.8.0").format == "hybrid"
    assert resolve_fp8(load_run_config(None, ["precision.dtype=bf16"])) is None
    # The names exist on megatron-core's TransformerConfig.
    from megatron.core.transformer import TransformerConfig

    fields = TransformerConfig.__dataclass_fields__
    assert all(name in fields for name in kw)


def test_fp8_without_transformer_engine_fails_before_training():
    """On this machine (no TE, no GPU) the model builder refuses fp8 before any layer exists."""
    from models.build import build_gpt_chunks

    cfg = fp8_cfg()
    with pytest.raises(PrecisionError, match="needs TransformerEngine"):
        build_gpt_chunks(cfg, torch.bfloat16, fp8=resolve_fp8(cfg))
    # The builder refuses an FP8 config whose settings were not resolved (never a silent bf16 model).
    with pytest.raises(ConfigError, match="no FP8 settings were given"):
        build_gpt_chunks(cfg, torch.bfloat16)


def test_alignment_is_checked_at_config_time():
    ok = fp8_cfg("precision.fp8_recipe=mxfp8")
    validate_run(ok, 8)
    # ffn 8200 / TP 1 is not a multiple of 32 (MXFP8) nor of 16.
    bad = fp8_cfg("precision.fp8_recipe=mxfp8", "model.ffn_hidden_size=8200")
    with pytest.raises(ConfigError, match=r"mxfp8 GEMMs need dimensions divisible by 32: FFN .* is 8200"):
        validate_run(bad, 8)
    # 8200 % 16 == 8: the per-tensor recipes refuse it too; 8208 passes them but not MXFP8.
    assert check_fp8_config(fp8_cfg("precision.fp8_recipe=tensorwise", "model.ffn_hidden_size=8200"))
    assert not check_fp8_config(fp8_cfg("precision.fp8_recipe=tensorwise", "model.ffn_hidden_size=8208"))
    assert check_fp8_config(fp8_cfg("precision.fp8_recipe=mxfp8", "model.ffn_hidden_size=8208"))
    # Tokens per micro-batch: 20 is not a multiple of 8.
    short = fp8_cfg("precision.fp8_recipe=delayed", "data.seq_length=20")
    assert any("tokens per micro-batch" in e for e in check_fp8_config(short))
    # Options that make no sense without FP8, and delayed + bf16 edge layers.
    assert check_fp8_config(load_run_config(None, ["precision.dtype=bf16", "precision.fp8_param=true"]))
    assert any(
        "delayed" in e
        for e in check_fp8_config(fp8_cfg("precision.fp8_recipe=delayed", "precision.first_last_layers_bf16=true"))
    )
    with pytest.raises(ConfigError, match="precision.fp8_recipe is 'fp4'"):
        validate_run(fp8_cfg("precision.fp8_recipe=fp4"), 8)


def test_mfu_uses_the_fp8_peak():
    from types import SimpleNamespace

    from engine.metrics import PEAK_TFLOPS

    assert mfu_precision(SimpleNamespace(fp8="e4m3", fp8_recipe="mxfp8"), torch.bfloat16) == "mxfp8"
    assert mfu_precision(SimpleNamespace(fp8="hybrid", fp8_recipe="tensorwise"), torch.bfloat16) == "fp8"
    assert mfu_precision(SimpleNamespace(fp8=None), torch.bfloat16) == "bf16"
    assert PEAK_TFLOPS["b200"]["mxfp8"] == 2 * PEAK_TFLOPS["b200"]["bf16"]
