"""Hugging Face -> engine: ``import hf`` round trip and ``checkpoint.init_from_hf`` at TP=2.

Oracle for the round trip: the safetensors files of the first export, read with
``safetensors`` itself; export(import(x)) must reproduce every tensor bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, losses, post_training_config, run_engine


def _tensors(d: Path):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def hf_llama(trained_checkpoint, megatron_single_rank, tmp_path_factory) -> Path:
    """The TP=2/PP=2 tiny-llama run exported in bf16 (a Hugging Face directory)."""
    from engine.export.hf import export_hf

    out = tmp_path_factory.mktemp("hf") / "llama"
    export_hf(trained_checkpoint("tiny-llama", 4, tensor=2, pipeline=2), out, dtype="bf16")
    return out


def test_export_of_import_is_tensor_identical(hf_llama, megatron_single_rank, tmp_path):
    from engine.export.hf import export_hf
    from engine.hf_import import import_hf

    ckpt = import_hf(hf_llama, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.model").is_file()
    meta = json.loads((ckpt / "engine_meta.json").read_text())
    assert meta["lineage"][0]["init_from"] == str(hf_llama.resolve())
    export_hf(tmp_path / "run", tmp_path / "again", dtype="bf16")
    a, b = _tensors(hf_llama), _tensors(tmp_path / "again")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for f in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        assert (hf_llama / f).read_text() == (tmp_path / "again" / f).read_text(), f


def test_unsupported_or_damaged_hf_dirs_are_one_line_errors(hf_llama, tmp_path):
    from engine.config import ConfigError
    from engine.hf_import import import_hf

    qwen = tmp_path / "qwen"
    shutil.copytree(hf_llama, qwen)
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps(dict(config, architectures=["Qwen2ForCausalLM"], model_type="qwen2")))
    with pytest.raises(ConfigError, match="unsupported Hugging Face architecture Qwen2ForCausalLM; supported: "
                       "LlamaForCausalLM, GPT2LMHeadModel, MixtralForCausalLM") as err:  # fmt: skip
        import_hf(qwen, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()

    trunc = tmp_path / "trunc"
    shutil.copytree(hf_llama, trunc)
    shard = trunc / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="unreadable safetensors file") as err:
        import_hf(trunc, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()

    with pytest.raises(ConfigError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "out")


def test_cli_import_unsupported_architecture_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "import", "hf", str(tmp_path), str(tmp_path / "out")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error:")]
    assert len(errors) == 1 and "unsupported Hugging Face architecture BertModel" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_hf_trains_at_tp2(hf_llama, post_training_data, megatron_single_rank, tmp_path):
    """A TP=2 run started from the Hugging Face directory: rank 0 converts once into the
    cache, both ranks load it resharded. With lr=0 the saved weights must still be the Hugging
    Face tensors exactly; the loss is finite; the lineage names the Hugging Face directory."""
    from engine import model_io
    from models.hf_convert import megatron_to_hf

    cfg = post_training_config(post_training_data, tmp_path / "run", "pretrain", "pretrain")
    cfg["training"]["steps"] = 1
    cfg["optimizer"].update(lr=0.0, min_lr=0.0)
    cfg["parallel"] = {"tensor": 2}
    cfg["checkpoint"]["init_from_hf"] = str(hf_llama)
    run_engine(cfg, nproc=2)
    assert all(l == l and l < 20 for l in losses(tmp_path / "run"))  # noqa: E741 (finite)
    cached = list((tmp_path / "run" / "hf_import").iterdir())
    assert len(cached) == 1
    loaded = model_io.load_model(tmp_path / "run", torch.float32)
    assert loaded.meta["lineage"][0]["init_from"] == str(Path(hf_llama).resolve())
    hf_sd = megatron_to_hf(loaded.model.state_dict(), loaded.cfg.model)
    want = _tensors(hf_llama)
    for k, v in want.items():
        assert torch.equal(hf_sd[k].to(v.dtype), v), k


def test_init_from_hf_refuses_another_network(hf_llama, post_training_data, tmp_path):
    """The run's model must be the Hugging Face network: refused before training, one line."""
    from engine.config import ConfigError
    from engine.run_config import load_run_config, validate_run

    cfg = load_run_config(None, [
        "model.preset=tiny-llama", "model.vocab_size=1024", "model.hidden_size=128",
        f"data.paths=[{post_training_data['pretrain']}]", f"checkpoint.init_from_hf={hf_llama}",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match="hidden_size: 128 != 64") as err:
        validate_run(cfg, 1)
    assert "\n" not in str(err.value)
    cfg = load_run_config(None, [
        "model.preset=tiny-llama", "model.vocab_size=1024", f"data.paths=[{post_training_data['pretrain']}]",
        f"checkpoint.init_from_hf={hf_llama}", "checkpoint.init_from=/x",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match="init_from_hf and checkpoint.init_from both"):
        validate_run(cfg, 1)
