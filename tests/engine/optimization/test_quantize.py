"""Post-training quantization and QAT through nvidia-modelopt (engine/optimization/quantize.py).

Oracles: the unquantized model's own logits and perplexity (quantization must move them, by
a bounded amount), the quantized model before it was saved (a reloaded checkpoint must give
the same logits bit for bit), and for the FP8 Hugging Face export, transformers' own LLaMA
with the exported E4M3 weights and activations dequantized by their scales (the format's
definition), against the engine's quantized model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, PrecisionConfig, field_choices
from tests.conftest import REPO

pytest.importorskip("modelopt.torch.quantization")

CPU_FORMATS = ("fp8", "int8", "int8_sq", "int4_awq", "w4a8_awq")
# Bound on |perplexity change| of the 3-step tiny model: weight-only 4-bit is the coarsest.
PPL_BOUND = {"fp8": 0.02, "int8": 0.02, "int8_sq": 0.02, "int4_awq": 0.10, "w4a8_awq": 0.10}


def test_format_names_agree():
    """The CLI's choices (kept free of imports), modelopt's config table and precision.qat's
    Literal are one list; every modelopt config named exists."""
    import modelopt.torch.quantization as mtq

    from engine.commands.quantize import FORMAT_CHOICES
    from engine.optimization.quantize import FORMATS

    qat = field_choices(typing.get_type_hints(PrecisionConfig)["qat"])
    assert tuple(FORMATS) == FORMAT_CHOICES == qat
    assert all(isinstance(getattr(mtq, name), dict) for name in FORMATS.values())


def test_each_cpu_format_round_trips(trained_checkpoint, post_training_data, tmp_path):
    """Each CPU format calibrates, changes held-out perplexity by a bounded, non-zero amount,
    and reloads from its checkpoint (config records the format, modelopt state restored
    before the weights) with bit-identical logits."""
    from engine import model_io
    from engine.optimization import quantize as q

    run = trained_checkpoint("tiny-llama")
    calib = q.token_windows(post_training_data["pretrain"], 8, 64)
    held_out = q.token_windows(post_training_data["pretrain"], 8, 64, skip=8)
    for fmt in CPU_FORMATS:
        loaded = model_io.load_model(run)
        vocab = loaded.cfg.model.vocab_size
        with torch.no_grad():
            plain = q.logits(loaded.model, held_out[:2, :-1])
        before = q.mean_nll(loaded.model, held_out, vocab, 4, "before")
        model = q.quantize_model(loaded.model, fmt, lambda m: q.forward_windows(m, calib, 4, "calibrate"))
        after = q.mean_nll(model, held_out, vocab, 4, "after")
        with torch.no_grad():
            quantized = q.logits(model, held_out[:2, :-1])
        assert not torch.equal(plain, quantized), fmt  # the quantizers act
        change = math.exp(after) / math.exp(before) - 1.0
        assert 0 < abs(change) < PPL_BOUND[fmt], (fmt, change)

        cfg = dataclasses.replace(loaded.cfg, precision=dataclasses.replace(loaded.cfg.precision, qat=fmt))
        saved = model_io.save_model_checkpoint(tmp_path / fmt, cfg, [model], iteration=loaded.iteration)
        reloaded = model_io.load_model(saved)
        assert reloaded.cfg.precision.qat == fmt
        with torch.no_grad():
            assert torch.equal(q.logits(reloaded.model, held_out[:2, :-1]), quantized), fmt
