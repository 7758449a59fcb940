"""Named model architectures: the three seed models and tiny versions of each for CPU tests.

A preset is a function returning a fresh ``ModelConfig``; YAML keys next to
``model.preset`` override its fields. The tiny presets keep every architectural feature of
their big sibling (GQA, RoPE, SwiGLU, tied embeddings, MoE routing, sliding windows) at a
size that trains on a CPU in seconds.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from engine.config import ConfigError, ModelConfig


def _llama(**overrides: Any) -> ModelConfig:
    base: Dict[str, Any] = dict(
        position_embedding="rope",
        normalization="RMSNorm",
        activation="swiglu",
        add_bias=False,
        tie_embeddings=True,
    )
    base.update(overrides)
    return ModelConfig(**base)


def _gpt2(**overrides: Any) -> ModelConfig:
    base: Dict[str, Any] = dict(
        position_embedding="learned_absolute",
        normalization="LayerNorm",
        activation="gelu",
        add_bias=True,
        tie_embeddings=True,
        norm_epsilon=1e-5,
    )
    base.update(overrides)
    return ModelConfig(**base)


def frankenstallm_3b() -> ModelConfig:
    """Korean LLaMA-style 3B (seed 000): 3.0B parameters with tied embeddings."""
    return _llama(
        preset="frankenstallm-3b",
        num_layers=28,
        hidden_size=3072,
        num_attention_heads=24,
        num_query_groups=8,
        ffn_hidden_size=8192,
        vocab_size=64256,
        max_seq_length=4096,
        rotary_base=500000.0,
        norm_epsilon=1e-5,
    )


def ff_2b() -> ModelConfig:
    """GPT-2-style 2.02B (seed 002)."""
    return _gpt2(
        preset="ff-2b",
        num_layers=38,
        hidden_size=2048,
        num_attention_heads=16,
        ffn_hidden_size=8192,
        vocab_size=50257,
        max_seq_length=1024,
    )


def keural_moe_15b() -> ModelConfig:
    """Korean-English MoE, 8 experts top-2, sliding window 512 on even layers (seed 003)."""
    return _llama(
        preset="keural-moe-15b",
        num_layers=24,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        ffn_hidden_size=5632,
        vocab_size=131074,
        max_seq_length=4096,
        rotary_base=500000.0,
        norm_epsilon=1e-5,
        num_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=5632,
        sliding_window=512,
        sliding_window_layers="even",
    )


def tiny_llama() -> ModelConfig:
    """frankenstallm-3b's architecture at CPU-test size (GQA 4:2, SwiGLU, RoPE, tied)."""
    return _llama(
        preset="tiny-llama",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=176,
        vocab_size=256,
        max_seq_length=256,
        rotary_base=500000.0,
    )


def tiny_gpt2() -> ModelConfig:
    """ff-2b's architecture at CPU-test size."""
    return _gpt2(
        preset="tiny-gpt2",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=256,
        vocab_size=256,
        max_seq_length=256,
    )


def tiny_moe() -> ModelConfig:
    """keural-moe-15b's architecture at CPU-test size (8 experts top-2, window on even layers)."""
    return _llama(
        preset="tiny-moe",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        ffn_hidden_size=128,
        vocab_size=256,
        max_seq_length=256,
        rotary_base=500000.0,
        num_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=128,
        sliding_window=16,
        sliding_window_layers="even",
    )


PRESETS: Dict[str, Callable[[], ModelConfig]] = {
    "frankenstallm-3b": frankenstallm_3b,
    "ff-2b": ff_2b,
    "keural-moe-15b": keural_moe_15b,
    "tiny-llama": tiny_llama,
    "tiny-gpt2": tiny_gpt2,
    "tiny-moe": tiny_moe,
}


def get_preset(name: str) -> ModelConfig:
    """Return a fresh ModelConfig for preset ``name`` (ConfigError naming the choices)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
