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

import numpy as np
import pytest
import torch

from engine.config import ConfigError, PrecisionConfig, field_choices
from engine.evaluation.perplexity import gpt_logits_fn
from tests.conftest import REPO

CPU_FORMATS = ("fp8", "int8", "int8_sq", "int4_awq", "w4a8_awq")
# Bound on |perplexity change| of the 3-step tiny model: weight-only 4-bit is the coarsest.
PPL_BOUND = {"fp8": 0.02, "int8": 0.02, "int8_sq": 0.02, "int4_awq": 0.10, "w4a8_awq": 0.10}


def _tokens(windows) -> torch.Tensor:
    """The inputs (all tokens but the last) of equal-length windows, as one batch."""
    return torch.from_numpy(np.stack([w.tokens[:-1] for w in windows]))


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
    calib = q.calibration_windows(post_training_data["pretrain"], 8, 64)
    held_out = q.held_out_windows(post_training_data["pretrain"], "80,20,0", "valid", 8, 64)
    tokens = _tokens(held_out[:2])
    for fmt in CPU_FORMATS:
        loaded = model_io.load_model(run)
        vocab = loaded.cfg.model.vocab_size
        with torch.no_grad():
            plain = gpt_logits_fn(loaded.model)(tokens)
        before = q.mean_nll(loaded.model, held_out, vocab, 4, "before")
        model = q.quantize_model(loaded.model, fmt, lambda m: q.forward_windows(m, calib, 4, "calibrate"))
        after = q.mean_nll(model, held_out, vocab, 4, "after")
        with torch.no_grad():
            quantized = gpt_logits_fn(model)(tokens)
        assert not torch.equal(plain, quantized), fmt  # the quantizers act
        change = math.exp(after) / math.exp(before) - 1.0
        assert 0 < abs(change) < PPL_BOUND[fmt], (fmt, change)

        cfg = dataclasses.replace(loaded.cfg, precision=dataclasses.replace(loaded.cfg.precision, qat=fmt))
        saved = model_io.save_model_checkpoint(tmp_path / fmt, cfg, [model], iteration=loaded.iteration)
        reloaded = model_io.load_model(saved)
        assert reloaded.cfg.precision.qat == fmt
        with torch.no_grad():
            assert torch.equal(gpt_logits_fn(reloaded.model)(tokens), quantized), fmt


def _quantize_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "engine", "quantize", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _fp8_dequantized_hf_model(hf_dir: Path):
    """transformers' LLaMA from the export, with modelopt's FP8 format applied by hand: each
    quantized linear's E4M3 weight times its ``weight_scale``, and its input cast to E4M3 at
    ``input_scale`` (per-tensor static scales), everything else as exported."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tensors = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    quantized = [k[: -len(".weight")] for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert quantized, "no FP8 weights in the export"
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    for name in quantized:
        linear = model.get_submodule(name)
        w = tensors[f"{name}.weight"].to(torch.float32) * tensors[f"{name}.weight_scale"].to(torch.float32)
        linear.weight.data.copy_(w)
        scale = tensors[f"{name}.input_scale"].to(torch.float32)

        def quantize_input(_module, args, scale=scale):
            x = args[0]
            q = (x / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).to(x.dtype)
            return (q * scale,)

        linear.register_forward_pre_hook(quantize_input)
    return model, len(quantized)


def test_quantize_command_fp8_and_hf_export(trained_checkpoint, post_training_data, tmp_path):
    """`python -m engine quantize --format fp8`: report, a checkpoint recording the format
    that load_model restores with its quantizers, and an HF export whose logits (transformers'
    LLaMA with the FP8 weights and activations dequantized by the exported scales) match the
    quantized engine model's."""
    from engine import model_io
    from engine.optimization import quantize as q

    out = tmp_path / "fp8"
    args = [str(trained_checkpoint("tiny-llama")), str(out), "--format", "fp8"]
    args += ["--calib-data", post_training_data["pretrain"], "--calib-samples", "8", "--eval-samples", "8"]
    proc = _quantize_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out perplexity" in proc.stdout
    report = json.loads((out / q.REPORT).read_text())
    assert report["format"] == "fp8" and report["hf_dir"] == str(out / "hf")
    assert 0 < abs(report["ppl_change"]) < PPL_BOUND["fp8"]

    loaded = model_io.load_model(out)
    assert loaded.cfg.precision.qat == "fp8"
    tokens = _tokens(q.held_out_windows(post_training_data["pretrain"], "80,20,0", "valid", 2, 64))
    with torch.no_grad():
        ours = gpt_logits_fn(loaded.model)(tokens)[..., : loaded.cfg.model.vocab_size]
    hf, n = _fp8_dequantized_hf_model(out / "hf")
    assert n == 4 * 7  # q, k, v, o, gate, up, down in each of the 4 layers
    with torch.no_grad():
        theirs = hf(tokens).logits
    # Scales are rounded differently (modelopt multiplies by 448/amax, the export stores
    # amax/448): a few activations land on a neighbouring E4M3 value, ~5e-4 in the logits.
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)
    for module in hf.modules():  # the oracle without activation quantization: far off
        module._forward_pre_hooks.clear()
    with torch.no_grad():
        assert (hf(tokens).logits - ours).abs().max() > 5 * 2e-3
    quant_cfg = json.loads((out / "hf" / "hf_quant_config.json").read_text())
    assert quant_cfg["quantization"]["quant_algo"] == "FP8"

    # The same export again from the saved checkpoint, through `export hf` (which hands a
    # quantized checkpoint to modelopt's exporter); the parity-checked path refuses it.
    from safetensors.torch import load_file

    from engine.cli import main as cli_main
    from engine.export.hf import export_hf

    again = tmp_path / "again"
    assert cli_main(["export", "hf", str(out), str(again)]) == 0
    with pytest.raises(ConfigError, match="is quantized"):
        export_hf(out, tmp_path / "parity")
    assert not (tmp_path / "parity").exists()
    for f in (out / "hf").glob("*.safetensors"):
        first, second = load_file(str(f)), load_file(str(again / f.name))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ConfigError, match="is not quantized"):
        q.export_quantized_checkpoint(trained_checkpoint("tiny-llama"), tmp_path / "plain")


def test_nvfp4_refused_on_cpu_in_one_line(tmp_path):
    """NVFP4 needs modelopt's CUDA kernels: refused before anything is loaded (a failed
    mtq.quantize would leave the process unusable), exit 2, one line, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("a GPU runs nvfp4")
    proc = _quantize_cli("no/such/ckpt", str(tmp_path / "out"), "--format", "nvfp4", "--calib-data", "x")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("config error: --format nvfp4 needs a CUDA GPU"), lines
    assert not (tmp_path / "out").exists()


def test_bad_inputs_refused_in_one_line(trained_checkpoint, post_training_data, tmp_path):
    """Missing calibration data, too little of it, an output directory in use, and an
    already-quantized source: each one ConfigError line, before any model is loaded."""
    from engine.optimization.quantize import quantize_checkpoint

    run = str(trained_checkpoint("tiny-llama"))
    data = post_training_data["pretrain"]
    cases = [
        (dict(calib_data=str(tmp_path / "nothing")), "nothing.bin does not exist"),
        (dict(calib_data=data, calib_samples=10**6), "fewer than the 1000000 asked for"),
    ]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases.append((dict(calib_data=data, out=str(busy)), "is not empty"))
    for kwargs, expected in cases:
        kwargs = {"checkpoint": run, "out": str(tmp_path / "out"), "fmt": "int8", "calib_samples": 4, **kwargs}
        with pytest.raises(ConfigError) as err:
            quantize_checkpoint(**kwargs)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_loading_a_quantized_checkpoint_needs_its_quantizers(trained_checkpoint, tmp_path):
    """The trainer refuses every mismatch between precision.qat and the starting checkpoint,
    and the checkpoint loader refuses to pour a quantized checkpoint into a plain model
    (dist_checkpointing would drop the quantizers silently)."""
    from types import SimpleNamespace

    from engine import checkpoint as ckpt_lib
    from engine import model_io
    from engine.optimization import quantize as q
    from engine.trainer import Trainer

    plain = ckpt_lib.latest_checkpoint(str(trained_checkpoint("tiny-llama")))
    loaded = model_io.load_model(plain)
    model = q.quantize_model(loaded.model, "int8", lambda m: gpt_logits_fn(m)(torch.ones(1, 8, dtype=torch.long)))
    cfg = dataclasses.replace(loaded.cfg, precision=dataclasses.replace(loaded.cfg.precision, qat="int8"))
    quantized = model_io.save_model_checkpoint(tmp_path / "q", cfg, [model])

    fresh = model_io.build_model(loaded.cfg, torch.float32)
    with pytest.raises(ckpt_lib.CheckpointError, match="modelopt-quantized"):
        ckpt_lib.load_checkpoint(quantized, fresh, load_optimizer=False)

    def run_with(qat):
        return SimpleNamespace(cfg=dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, qat=qat)))

    for qat, source, expected in [
        ("int8", None, "set checkpoint.init_from"),
        ("int8", plain, "is not quantized"),
        (None, quantized, "set precision.qat=int8"),
        ("fp8", quantized, "is quantized as int8"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            Trainer._restore_quantizers(run_with(qat), fresh, source)


@pytest.mark.slow
def test_qat_loss_falls_and_resume_is_exact(trained_checkpoint, post_training_data, tmp_path):
    """precision.qat=fp8 fine-tunes an FP8-quantized checkpoint through its fake quantizers:
    held-out loss of the quantized model falls, the QAT checkpoints reload with their
    quantizers, and a run interrupted at step 2 and resumed gives the uninterrupted run's
    losses exactly."""
    from engine import model_io
    from engine.optimization import quantize as q
    from tests.conftest import losses, post_training_config, run_engine

    data = post_training_data["pretrain"]
    loaded = model_io.load_model(trained_checkpoint("tiny-llama"))
    calib = q.calibration_windows(data, 8, 64)
    model = q.quantize_model(loaded.model, "fp8", lambda m: q.forward_windows(m, calib, 4, "calibrate"))
    cfg = dataclasses.replace(loaded.cfg, precision=dataclasses.replace(loaded.cfg.precision, qat="fp8"))
    start = model_io.save_model_checkpoint(tmp_path / "ptq", cfg, [model])

    def qat_run(name, **checkpoint):
        run_cfg = post_training_config(post_training_data, tmp_path / name, "pretrain", "pretrain")
        run_cfg["training"]["steps"] = 4
        run_cfg["precision"]["qat"] = "fp8"
        run_cfg["checkpoint"].update(keep=0, **checkpoint)
        run_engine(run_cfg)
        return losses(tmp_path / name)

    whole = qat_run("whole", init_from=str(start), save_interval=2)
    resumed = qat_run("resumed", load=str(tmp_path / "whole" / "checkpoints" / "iter_0000002"))
    assert resumed == whole[2:]

    held_out = q.held_out_windows(data, "80,20,0", "valid", 16, 64)
    before = q.mean_nll(model, held_out, 1024, 4, "before QAT")
    after_qat = model_io.load_model(tmp_path / "whole")
    assert after_qat.cfg.precision.qat == "fp8"
    assert q.mean_nll(after_qat.model, held_out, 1024, 4, "after QAT") < before - 0.05
    assert whole[-1] < whole[0]
