"""FLOPs per token against the parameters of the built model; MFU arithmetic; log line."""

from __future__ import annotations

import pytest
import torch

from engine.config import attention_keys_per_query
from engine.metrics import PEAK_TFLOPS, format_line, mfu
from engine.run_config import load_run_config


def _linear_weights(preset):
    """Weights a token multiplies through, counted on the built model (meta device)."""
    from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: F401

    from models.build import build_gpt_chunks
    from parallel.setup import init_distributed, init_model_parallel

    cfg = load_run_config(None, [f"model.preset={preset}"])
    init_distributed(cfg.parallel)
    init_model_parallel(cfg.parallel, seed=0)
    with torch.device("meta"):
        chunk = build_gpt_chunks(cfg, torch.float32).chunks[0]
    n = 0
    for p in chunk.parameters():
        if p.dim() == 2:  # linear layers and the (tied) embedding used as the LM head
            n += p.numel()
    return cfg, n


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_flops_match_built_model(preset):
    cfg, weights = _linear_weights(preset)
    m, seq = cfg.model, 128
    if m.position_embedding == "learned_absolute":
        weights -= m.max_seq_length * m.hidden_size  # a lookup table, not a matmul
    head_dim = m.hidden_size // m.num_attention_heads
    attention = m.num_layers * 2 * 2 * m.num_attention_heads * head_dim * (seq + 1) / 2
    assert m.flops_per_token(seq) == pytest.approx(3 * (2 * weights + attention), rel=1e-12)
    assert m.flops_per_token(seq, training=False) == pytest.approx(2 * weights + attention, rel=1e-12)


def test_sliding_window_attention_keys():
    assert attention_keys_per_query(8, 0) == pytest.approx(sum(range(1, 9)) / 8)
    # window 3 over 8 positions: 1, 2, 3, 3, 3, 3, 3, 3 keys.
    assert attention_keys_per_query(8, 3) == pytest.approx((1 + 2 + 3 * 6) / 8)


def test_mfu_against_peak_table():
    assert mfu(10_000, 2e10, "h100", "bf16") == pytest.approx(10_000 * 2e10 / 989e12)
    assert mfu(10_000, 2e10, None, "bf16") is None  # CPU: n/a
    assert PEAK_TFLOPS["b200"]["mxfp8"] > PEAK_TFLOPS["b200"]["bf16"]
    line = format_line(3, 10, {"loss": 2.0, "tokens_per_s": 100.0, "tokens_per_s_per_gpu": 50.0, "mfu": None})
    assert "MFU n/a" in line and "tok/s/gpu 50" in line and "tok/s 100" in line
