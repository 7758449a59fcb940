"""Parameter counts of the presets, computed from the built model (meta device)."""

from __future__ import annotations

import pytest

from engine.commands.info import model_info
from engine.run_config import load_run_config


def _info(preset):
    return model_info(load_run_config(None, [f"model.preset={preset}"]))


def test_frankenstallm_3b_is_3b_not_2_4b():
    info = _info("frankenstallm-3b")
    # Closed form: 28 x (attention 25.17M + SwiGLU 75.50M + 2 norms) + tied embedding + final norm.
    h, ffn, kv = 3072, 8192, 8 * 128
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * ffn + 2 * h
    assert info["total"] == 28 * per_layer + 64256 * h + h
    assert info["total"] == pytest.approx(3.016e9, rel=1e-3)  # the card's "2.4B" is wrong
    assert info["active"] == info["total"]


def test_ff_2b():
    info = _info("ff-2b")
    assert info["total"] == pytest.approx(2.02e9, rel=5e-3)


def test_keural_moe_total_and_active():
    info = _info("keural-moe-15b")
    assert info["total"] == pytest.approx(14.83e9, rel=2e-3)
    # Active: attention + 2 of 8 experts + router per layer, + embedding. The card's
    # "~7.42B active" is half the total, not what top-2 of 8 routing activates.
    h, kv, e = 4096, 8 * 128, 5632
    attn = h * (h + 2 * kv) + h * h
    per_layer_active = attn + 2 * 3 * h * e + 8 * h + 2 * h
    expected = 24 * per_layer_active + 131200 * h + h
    assert info["active"] == expected
    assert info["active"] == pytest.approx(4.87e9, rel=2e-3)


def test_sequence_parallel_refused_on_torch_norm_fallback():
    """megatron-core's torch norms assert deep inside model construction; the spec says why first."""
    import importlib.util

    from engine.config import ConfigError
    from models.presets import get_preset
    from models.specs import layer_spec

    if importlib.util.find_spec("apex") is not None:
        pytest.skip("apex installed: its fused norms support sequence parallelism")
    with pytest.raises(ConfigError, match="parallel.sequence_parallel needs TransformerEngine"):
        layer_spec(get_preset("tiny-llama"), use_te=False, sequence_parallel=True)
    layer_spec(get_preset("tiny-llama"), use_te=False, sequence_parallel=False)
