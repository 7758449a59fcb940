"""Config loading: unknown keys, types, presets, overrides and size checks with their messages."""
from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config, parse_overrides, validate


def _cfg(*overrides):
    return load_config(None, ["data.paths=[x]", *overrides])


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1.5e-4\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "optimizer.weight_decy" in msg and "'weight_decay'" in msg and "Did you mean" in msg


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match="unknown key 'trainig'.*'training'"):
        load_config(None, ["trainig.steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'training.step'"):
        load_config(None, ["training.step=3"])


def test_yaml_scientific_notation_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: 3e-4}\ntraining: {steps: 10}\n")
    cfg = load_config(path)
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="'training.steps' must be an integer"):
        load_config(None, ["training.steps=ten"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["parallel.sequence_parallel=3"])


def test_preset_then_overrides():
    cfg = load_config(None, ["model.preset=frankenstallm-3b", "model.num_layers=2"])
    assert cfg.model.hidden_size == 3072 and cfg.model.num_layers == 2
    with pytest.raises(ConfigError, match="unknown model preset 'llama-3b'.*frankenstallm-3b"):
        load_config(None, ["model.preset=llama-3b"])


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("overrides, world, message", [
    (["model.preset=frankenstallm-3b", "parallel.tensor=16"], 16,
     r"model.num_attention_heads \(24\) is not divisible by parallel.tensor \(16\)"),
    (["model.preset=frankenstallm-3b", "parallel.pipeline=3"], 3,
     r"model.num_layers \(28\) is not divisible by parallel.pipeline x parallel.virtual_pipeline \(3 x 1 = 3\)"),
    (["model.preset=tiny-llama", "parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2,
     r"model.num_layers \(4\) is not divisible by parallel.pipeline x parallel.virtual_pipeline \(2 x 4 = 8\)"),
    (["model.preset=tiny-llama", "parallel.tensor=2"], 3,
     r"world size \(3\) is not divisible by parallel.tensor x parallel.pipeline x parallel.context \(2 x 1 x 1 = 2\)"),
    (["model.preset=tiny-moe", "parallel.expert=3"], 3,
     r"model.num_experts \(8\) is not divisible by parallel.expert \(3\)"),
    (["model.preset=tiny-llama", "training.global_batch_size=10", "training.micro_batch_size=2"], 2,
     r"training.global_batch_size \(10\) is not divisible by training.micro_batch_size x data-parallel size \(2 x 2 = 4\)"),
    (["model.preset=tiny-llama", "parallel.expert=2"], 2, r"the model is dense"),
    (["model.preset=tiny-llama", "data.seq_length=4096"], 1, r"data.seq_length \(4096\) exceeds model.max_seq_length \(256\)"),
    (["model.preset=tiny-llama", "model.activation=relu"], 1, r"model.activation is 'relu'; choose one of swiglu, gelu"),
    (["model.preset=tiny-llama", "objective.name=sft", "parallel.context=2"], 2,
     r"data.packing needs parallel.context = 1 \(got 2\)"),
])
def test_bad_combinations_name_the_numbers(overrides, world, message):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_valid_layouts_pass():
    validate(_cfg("model.preset=frankenstallm-3b", "parallel.tensor=8", "training.global_batch_size=256"), 8)
    validate(_cfg("model.preset=keural-moe-15b", "parallel.expert=8", "training.global_batch_size=64"), 8)
    validate(_cfg("model.preset=tiny-llama", "parallel.pipeline=2", "parallel.virtual_pipeline=2"), 2)


def test_cli_reports_config_errors(tmp_path, capsys):
    from engine.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny-llama}\nmodel_typo: 1\n")
    assert main(["train", str(path)]) == 2
    assert "unknown key 'model_typo'" in capsys.readouterr().err


def test_named_blend_fills_paths_and_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  blend:\n    - {name: kowiki, path: /d/kowiki, weight: 0.3}\n"
                    "    - {name: web, path: /d/web, weight: 0.7}\n")
    cfg = load_config(path)
    assert cfg.data.paths == ["/d/kowiki", "/d/web"] and cfg.data.weights == [0.3, 0.7]
    assert [e.name for e in cfg.data.blend] == ["kowiki", "web"]
    path.write_text("data:\n  blend:\n    - {name: kowiki, pth: /d/kowiki}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.blend\[0\].pth'.*'path'"):
        load_config(path)
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["data.paths=[/d/a]", "data.blend=[{path: /d/b}]"])
