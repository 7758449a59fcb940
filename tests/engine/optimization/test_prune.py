"""Minitron pruning through modelopt (engine/optimization/prune.py, `python -m engine prune`).

Oracles: the pruned tensors are found, value for value, inside the source model's (so the
model really shrank and kept the source's weights, whatever ``model.config`` says); shapes are
read from the parameters and from the exported safetensors, not from any config; the HF
export is compared with transformers' own model by the exporter's parity check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import ConfigError, ParallelConfig
from engine.optimization.modelopt_state import STATE_DIR
from engine.optimization.prune import (
    INSTALL_HINT,
    PruneTargets,
    check_targets,
    fresh_model,
    minitron_prune,
    prune_checkpoint,
    pruned_model_config,
)
from models.presets import get_preset
from tests.conftest import run_engine

# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("width=32", "expected KEY=SIZE with KEY one of hidden, ffn, heads, layers, experts"),
        ("hidden", "expected KEY=SIZE"),
        ("hidden=4x", "must be a whole number"),
        ("layers=0", "must be at least 1"),
        ("hidden=32,hidden=16", "names hidden twice"),
        (" , ", "names no size"),
    ],
)
def test_malformed_targets_refused_in_one_line(text, fragment):
    with pytest.raises(ConfigError, match="^[^\n]*$") as err:
        PruneTargets.parse(text)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "preset, layout, text, fragment",
    [
        ("tiny-llama", {}, "hidden=65", "--target hidden=65: larger than the model's 64"),
        ("tiny-llama", {}, "layers=5", "larger than the model's 4"),
        ("tiny-moe", {}, "ffn=129", "larger than the model's 128"),
        ("tiny-llama", {}, "heads=3", "multiple of the model's 2 key/value groups"),
        ("tiny-llama", {"tensor": 2}, "ffn=95", "--target ffn=95: not divisible by parallel.tensor (2)"),
        ("tiny-gpt2", {"tensor": 4}, "heads=2", "--target heads=2: not divisible by parallel.tensor (4)"),
        ("tiny-llama", {"pipeline": 2}, "layers=3", "not divisible by parallel.pipeline x virtual_pipeline (2)"),
        ("tiny-llama", {}, "experts=2", "the model is dense"),
        ("tiny-moe", {"expert": 4}, "experts=6", "not divisible by parallel.expert (4)"),
        ("tiny-moe", {}, "experts=1", "fewer than the 2 experts each token is routed to"),
    ],
)
def test_impossible_targets_refused_in_one_line(preset, layout, text, fragment):
    with pytest.raises(ConfigError, match="^[^\n]*$") as err:
        check_targets(get_preset(preset), ParallelConfig(**layout), PruneTargets.parse(text))
    assert fragment in str(err.value)


def test_possible_targets_pass():
    check_targets(get_preset("tiny-llama"), ParallelConfig(tensor=2), PruneTargets.parse("hidden=48,ffn=96,heads=2"))
    check_targets(get_preset("tiny-moe"), ParallelConfig(expert=2), PruneTargets.parse("experts=4,ffn=64,layers=2"))


@pytest.mark.parametrize(
    "kept, expected",
    [([1, 3], (16, "all")), ([1, 2], (16, "even")), ([2, 3], (16, "odd")), ([2, 4], (0, "even"))],
)
def test_sliding_window_pattern_follows_the_kept_layers(kept, expected):
    # tiny-moe windows its even layers (0-based): layers 1 and 3 of 4, 1-based.
    cfg = pruned_model_config(get_preset("tiny-moe"), PruneTargets(layers=2), kept)
    assert (cfg.sliding_window, cfg.sliding_window_layers) == expected
    original = get_preset("tiny-moe").window_layers()
    assert (cfg.window_layers() or [0, 0]) == [original[n - 1] for n in kept]


def test_inexpressible_sliding_window_refused():
    with pytest.raises(ConfigError, match="cannot express"):
        pruned_model_config(get_preset("tiny-moe"), PruneTargets(layers=3), [1, 2, 4])


def test_pruned_config_writes_out_head_dim_and_groups():
    cfg = pruned_model_config(get_preset("tiny-llama"), PruneTargets(hidden=48, heads=2), [1, 2, 3, 4])
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.query_groups) == (48, 2, 16, 2)
    assert (cfg.kv_channels, cfg.num_query_groups) == (16, 2)  # not re-derived from 48 / 2


# ------------------------------------------------------------------ pruning in this process


def _build(preset: str, seed: int = 0):
    from engine.run_config import load_run_config
    from models.build import build_gpt_chunks

    cfg = load_run_config(None, [f"model.preset={preset}", "precision.dtype=fp32"])
    torch.manual_seed(seed)
    (model,) = build_gpt_chunks(cfg, torch.float32).chunks
    with torch.no_grad():  # norms start at 1: give them values a wrong slice would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, model


def _calibration(model):
    tokens = torch.randint(1, 250, (8, 32), generator=torch.Generator().manual_seed(1))

    def loop(m):
        positions = torch.arange(32).unsqueeze(0).expand(4, 32)
        for batch in tokens.split(4):
            m(batch, positions, None)

    return loop


def _columns_in(pruned: torch.Tensor, source: torch.Tensor) -> list:
    """Index of the source column equal to each pruned column (fails when one is missing)."""
    found = []
    for j in range(pruned.shape[1]):
        hits = (source == pruned[:, j : j + 1]).all(dim=0).nonzero().flatten().tolist()
        assert hits, f"pruned column {j} is not a column of the source"
        found.append(hits[0])
    return found


def test_width_and_depth_pruning_shrinks_real_weights_to_slices_of_the_source(megatron_single_rank):
    cfg, model = _build("tiny-llama")
    source = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    targets = PruneTargets(hidden=48, ffn=96, heads=2, layers=3)
    kept = minitron_prune(model, cfg.model, targets, _calibration(model))

    assert len(kept) == 3 and kept == sorted(kept) and set(kept) <= {1, 2, 3, 4}
    w = dict(model.named_parameters())
    head_dim, groups = 16, 2
    assert len(model.decoder.layers) == 3
    assert w["embedding.word_embeddings.weight"].shape == (256, 48)
    for i in range(3):
        p = f"decoder.layers.{i}."
        assert w[p + "self_attention.linear_qkv.weight"].shape == ((2 + 2 * groups) * head_dim, 48)
        assert w[p + "self_attention.linear_proj.weight"].shape == (48, 2 * head_dim)
        assert w[p + "mlp.linear_fc1.weight"].shape == (2 * 96, 48)  # SwiGLU: gate and up
        assert w[p + "mlp.linear_fc2.weight"].shape == (48, 96)
        assert w[p + "input_layernorm.weight"].shape == (48,)

    # The kept hidden channels: columns of the source embedding; every other tensor is the
    # source's at those channels (and at the kept FFN channels / heads).
    hidden = _columns_in(w["embedding.word_embeddings.weight"], source["embedding.word_embeddings.weight"])
    assert len(set(hidden)) == 48
    for i, n in enumerate(kept):
        p, q = f"decoder.layers.{i}.", f"decoder.layers.{n - 1}."
        assert torch.equal(w[p + "input_layernorm.weight"], source[q + "input_layernorm.weight"][hidden])
        fc2 = w[p + "mlp.linear_fc2.weight"]
        ffn = _columns_in(fc2, source[q + "mlp.linear_fc2.weight"][hidden])
        assert len(set(ffn)) == 96
        rows = ffn + [c + 176 for c in ffn]  # fc1 stacks gate and up rows of 176 channels
        assert torch.equal(w[p + "mlp.linear_fc1.weight"], source[q + "mlp.linear_fc1.weight"][rows][:, hidden])
        proj = w[p + "self_attention.linear_proj.weight"]
        assert len(_columns_in(proj, source[q + "self_attention.linear_proj.weight"][hidden])) == 2 * head_dim

    tokens = torch.randint(1, 250, (2, 16))
    logits = model(tokens, torch.arange(16).unsqueeze(0).expand(2, 16), None)
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


def test_moe_depth_pruning_keeps_the_source_layers_and_renumbers_their_routers(megatron_single_rank):
    cfg, model = _build("tiny-moe", seed=3)
    source = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    targets = PruneTargets(layers=2, experts=4)
    kept = minitron_prune(model, cfg.model, targets, _calibration(model))
    new_cfg = pruned_model_config(cfg.model, targets, kept)
    import dataclasses

    fresh = fresh_model(model, dataclasses.replace(cfg, model=new_cfg), torch.float32)
    routers = [layer.mlp.router for layer in fresh.decoder.layers]
    assert [r.layer_number for r in routers] == [1, 2] == [layer.layer_number for layer in fresh.decoder.layers]
    assert all(r.weight.shape == (4, 64) for r in routers)
    assert len(fresh.decoder.layers[0].mlp.experts.local_experts) == 4
    for i, n in enumerate(kept):  # width untouched: the kept layers' attention is the source's
        key = "self_attention.linear_qkv.weight"
        assert torch.equal(fresh.state_dict()[f"decoder.layers.{i}.{key}"], source[f"decoder.layers.{n - 1}.{key}"])
        # each kept expert is one of the source layer's experts
        expert = fresh.state_dict()[f"decoder.layers.{i}.mlp.experts.local_experts.0.linear_fc2.weight"]
        assert any(
            torch.equal(expert, source[f"decoder.layers.{n - 1}.mlp.experts.local_experts.{e}.linear_fc2.weight"])
            for e in range(8)
        )
    assert new_cfg.window_layers() in (None, [cfg.model.window_layers()[n - 1] for n in kept])


# ------------------------------------------------------------------- checkpoint end to end


def test_cli_refuses_a_bad_target_in_one_line(trained_checkpoint, post_training_data, tmp_path, capsys):
    from engine.cli import main

    args = ["prune", str(trained_checkpoint("tiny-llama")), str(tmp_path / "out"), "--target", "heads=8"]
    assert main([*args, "--calib-data", post_training_data["pretrain"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: --target heads=8: larger than the model's 4 (pruning only shrinks)"
    assert not (tmp_path / "out").exists()


def test_pruned_checkpoint_trains_and_exports_with_parity(trained_checkpoint, post_training_data, tmp_path):
    from safetensors import safe_open

    from engine.export.hf import export_hf

    source = trained_checkpoint("tiny-llama")
    out = tmp_path / "pruned"
    result = prune_checkpoint(
        source, out, PruneTargets.parse("hidden=48,ffn=96,heads=2,layers=3"), post_training_data["pretrain"], 8
    )
    report = json.loads((out / "prune_report.json").read_text())
    assert report["kept_layers"] == result.kept_layers and len(result.kept_layers) == 3
    assert result.params_after < result.params_before
    assert not (result.checkpoint / STATE_DIR).exists()  # a plain model: no modelopt state to restore

    # train 2 steps from it, with its own config
    cfg = yaml.safe_load((result.checkpoint / "config.yaml").read_text())
    assert cfg["model"]["hidden_size"] == 48 and cfg["model"]["num_layers"] == 3
    cfg["checkpoint"] = {"dir": str(tmp_path / "finetuned"), "init_from": str(result.checkpoint)}
    cfg["training"]["steps"] = 2
    run_engine(cfg)
    finetuned = sorted((tmp_path / "finetuned" / "checkpoints").glob("iter_*"))[-1]

    hf = tmp_path / "hf"
    info = export_hf(finetuned, hf, dtype="fp32")  # raises ParityError beyond its tolerance
    assert info["parity"]["max_abs_logit_diff"] < 1e-4
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.embed_tokens.weight"] == (1024, 48)
    assert {k.split(".")[2] for k in shapes if k.startswith("model.layers.")} == {"0", "1", "2"}
    assert shapes["model.layers.2.mlp.gate_proj.weight"] == (96, 48)
    assert shapes["model.layers.2.self_attn.q_proj.weight"] == (2 * 16, 48)
    assert shapes["model.layers.2.self_attn.k_proj.weight"] == (2 * 16, 48)


def test_without_modelopt_the_command_says_what_to_install(monkeypatch, tmp_path, capsys):
    from engine.cli import main

    monkeypatch.setitem(sys.modules, "modelopt.torch.prune", None)  # import fails as if absent
    args = ["prune", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--target", "layers=1"]
    assert main([*args, "--calib-data", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.strip() == f"config error: {INSTALL_HINT}"
    assert "pip install -e .[opt]" in INSTALL_HINT
    assert not Path(tmp_path / "out").exists()


@pytest.mark.slow
def test_moe_checkpoint_saved_at_ep2_pp2_prunes_and_trains(trained_checkpoint, post_training_data, tmp_path):
    from engine.model_io import load_model

    source = trained_checkpoint("tiny-moe", 4, expert=2, pipeline=2)  # resharded to one process on load
    targets = PruneTargets.parse("hidden=48,ffn=64,experts=4,layers=2")
    result = prune_checkpoint(source, tmp_path / "pruned", targets, post_training_data["pretrain"], 8)
    cfg = yaml.safe_load((result.checkpoint / "config.yaml").read_text())
    assert cfg["parallel"]["expert"] == 2 and cfg["parallel"]["pipeline"] == 2  # the layout it trains at

    cfg["checkpoint"] = {"dir": str(tmp_path / "finetuned"), "init_from": str(result.checkpoint)}
    cfg["training"]["steps"] = 2
    run_engine(cfg, nproc=4)  # the source's layout: EP=2, PP=2
    finetuned = load_model(tmp_path / "finetuned")
    layers = finetuned.model.decoder.layers
    assert [layer.mlp.router.layer_number for layer in layers] == [1, 2]
    w = dict(finetuned.model.named_parameters())
    assert w["decoder.layers.1.mlp.router.weight"].shape == (4, 48)
    assert w["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"].shape == (48, 64)
    assert len(layers[1].mlp.experts.local_experts) == 4
