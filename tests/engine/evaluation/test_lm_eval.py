"""lm-evaluation-harness on an exported checkpoint, with the repository's local task."""

from __future__ import annotations

import math

import torch

from tests.conftest import REPO

TASKS = REPO / "examples" / "lm_eval_tasks"


def _export(ckpt, out):
    """The checkpoint as a Hugging Face directory (model + tokenizer files)."""
    try:
        from engine.export.hf import export_hf
    except ImportError:  # before the HF export lands: transformers' save_pretrained of the conversion
        export_hf = None
    if export_hf is not None:
        export_hf(ckpt, out, dtype="fp32")
        return
    from transformers import PreTrainedTokenizerFast

    from engine.data.tokenizer import load_tokenizer
    from engine.model_io import load_model
    from models.hf_convert import hf_config, hf_model_class, megatron_to_hf

    loaded = load_model(ckpt)
    tok = load_tokenizer(loaded.cfg.data.tokenizer)
    config = hf_config(loaded.cfg.model, eos_token_id=tok.eod)
    model = hf_model_class(loaded.cfg.model)(config)
    model.load_state_dict(megatron_to_hf(loaded.model.state_dict(), loaded.cfg.model), strict=True)
    model.save_pretrained(out)
    tok_dir = loaded.cfg.data.tokenizer
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=f"{tok_dir}/tokenizer.json", eos_token="</s>", pad_token="<pad>")
    hf_tok.save_pretrained(out)


def test_lm_eval_local_task_on_exported_model(trained_checkpoint, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = tmp_path / "hf"
    _export(trained_checkpoint("tiny-llama"), out)
    monkeypatch.chdir(REPO)  # the task's data_files is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=8, dtype=torch.float32)
    results = simple_evaluate(
        model=lm,
        tasks=["engine_constitution_mc"],
        # Only the repository's tasks: indexing lm_eval's thousands of built-in ones takes seconds.
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
    )
    metrics = results["results"]["engine_constitution_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and math.isfinite(metrics["acc,none"])
    assert results["n-samples"]["engine_constitution_mc"]["effective"] == 6
