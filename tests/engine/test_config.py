"""Config loading: unknown keys, types, presets, overrides and size checks with their messages."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config, parse_overrides
from engine.run_config import load_run_config, validate_run


def _cfg(*overrides):
    return load_run_config(None, ["data.paths=[x]", *overrides])


def test_unknown_key_names_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1.5e-4\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    msg = str(err.value)
    assert "optimizer.weight_decy" in msg and "'weight_decay'" in msg and "Did you mean" in msg


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match="unknown key 'trainig'.*'training'"):
        load_run_config(None, ["trainig.steps=3"])
    with pytest.raises(ConfigError, match="unknown key 'training.step'"):
        load_run_config(None, ["training.step=3"])


def test_yaml_scientific_notation_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: 3e-4}\ntraining: {steps: 10}\n")
    cfg = load_run_config(path)
    assert cfg.optimizer.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="'training.steps' must be an integer"):
        load_run_config(None, ["training.steps=ten"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_run_config(None, ["parallel.sequence_parallel=3"])


def test_preset_then_overrides():
    cfg = load_run_config(None, ["model.preset=frankenstallm-3b", "model.num_layers=2"])
    assert cfg.model.hidden_size == 3072 and cfg.model.num_layers == 2
    with pytest.raises(ConfigError, match="unknown model preset 'llama-3b'.*frankenstallm-3b"):
        load_run_config(None, ["model.preset=llama-3b"])


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["model.preset=frankenstallm-3b", "parallel.tensor=16"],
            16,
            r"model.num_attention_heads \(24\) is not divisible by parallel.tensor \(16\)",
        ),
        (
            ["model.preset=frankenstallm-3b", "parallel.pipeline=3"],
            3,
            r"model.num_layers \(28\) is not divisible by parallel.pipeline x parallel.virtual_pipeline \(3 x 1 = 3\)",
        ),
        (
            ["model.preset=tiny-llama", "parallel.pipeline=2", "parallel.virtual_pipeline=4"],
            2,
            r"model.num_layers \(4\) is not divisible by parallel.pipeline x parallel.virtual_pipeline \(2 x 4 = 8\)",
        ),
        (
            ["model.preset=tiny-llama", "parallel.tensor=2"],
            3,
            r"world size \(3\) is not divisible by parallel.tensor x parallel.pipeline x parallel.context \(2 x 1 x 1 = 2\)",
        ),
        (
            ["model.preset=tiny-moe", "parallel.expert=3"],
            3,
            r"model.num_experts \(8\) is not divisible by parallel.expert \(3\)",
        ),
        (
            ["model.preset=tiny-llama", "training.global_batch_size=10", "training.micro_batch_size=2"],
            2,
            r"training.global_batch_size \(10\) is not divisible by training.micro_batch_size x data-parallel size \(2 x 2 = 4\)",
        ),
        (["model.preset=tiny-llama", "parallel.expert=2"], 2, r"the model is dense"),
        (
            ["model.preset=tiny-llama", "data.seq_length=4096"],
            1,
            r"data.seq_length \(4096\) exceeds model.max_seq_length \(256\)",
        ),
        (
            ["model.preset=tiny-llama", "objective.name=sft", "parallel.context=2"],
            2,
            r"data.packing needs parallel.context = 1 \(got 2\)",
        ),
    ],
)
def test_bad_combinations_name_the_numbers(overrides, world, message):
    cfg = _cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        validate_run(cfg, world)


def test_valid_layouts_pass():
    validate_run(_cfg("model.preset=frankenstallm-3b", "parallel.tensor=8", "training.global_batch_size=256"), 8)
    validate_run(_cfg("model.preset=keural-moe-15b", "parallel.expert=8", "training.global_batch_size=64"), 8)
    validate_run(_cfg("model.preset=tiny-llama", "parallel.pipeline=2", "parallel.virtual_pipeline=2"), 2)


def test_choices_are_literal_types_checked_by_the_loader_and_by_validate():
    # The loader refuses a value outside the Literal, naming key, value and choices...
    with pytest.raises(ConfigError, match=r"model.activation is 'relu'; choose one of swiglu, gelu"):
        _cfg("model.preset=tiny-llama", "model.activation=relu")
    with pytest.raises(ConfigError, match=r"objective.dpo.loss is 'kto'; choose one of sigmoid, ipo, hinge"):
        load_config(None, ["objective.dpo.loss=kto"])
    # ... and validate catches one set in code, which the loader never saw.
    cfg = _cfg("model.preset=tiny-llama")
    cfg.model.activation = "relu"
    with pytest.raises(ConfigError, match=r"model.activation is 'relu'; choose one of swiglu, gelu"):
        validate_run(cfg, 1)
    from engine.config_reference import reference_markdown

    assert "| `model.activation` | `str` | one of `swiglu`, `gelu` | `'swiglu'` |" in reference_markdown()


def test_old_objective_keys_say_where_they_moved(tmp_path):
    for old, new in [
        ("orpo_lambda=0.5", "objective.orpo.weight"),
        ("beta=0.2", "objective.dpo.beta"),
        ("dpo_loss=ipo", "objective.dpo.loss"),
        ("reference=/ckpt", "objective.dpo.reference"),
        ("nll_includes_prompt=true", "objective.orpo.nll_includes_prompt"),
    ]:
        with pytest.raises(ConfigError, match=rf"'objective.{old.split('=')[0]}' moved to '{new}'"):
            load_config(None, [f"objective.{old}"])
    path = tmp_path / "c.yaml"
    path.write_text("objective: {name: dpo, dpo: {beta: 0.3, loss: hinge}, orpo: {weight: 0.5}}\n")
    cfg = load_config(path)
    assert (cfg.objective.dpo.beta, cfg.objective.dpo.loss, cfg.objective.orpo.weight) == (0.3, "hinge", 0.5)
    assert cfg.objective.dpo.label_smoothing == 0.0  # the defaults live in the config only


def test_config_layer_resolves_presets_only_through_the_callers_hook():
    with pytest.raises(ConfigError, match="no preset resolver"):
        load_config(None, ["model.preset=tiny-llama"])
    from models.presets import get_preset

    assert (
        load_config(None, ["model.preset=tiny-llama"], presets=get_preset).model
        == load_run_config(None, ["model.preset=tiny-llama"]).model
    )


def test_derived_sizes_live_on_the_config():
    m = _cfg("model.preset=frankenstallm-3b").model
    assert (m.head_dim, m.query_groups, m.padded_vocab_size) == (128, 8, 64256)
    m.kv_channels, m.num_query_groups, m.vocab_size = 96, None, 64001
    assert (m.head_dim, m.query_groups, m.padded_vocab_size) == (96, 24, 64128)
    p = _cfg("parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2").parallel
    assert (p.model_parallel, p.data_parallel(16), p.expert_data_parallel(16)) == (4, 4, 2)


def test_cli_reports_config_errors(tmp_path, capsys):
    from engine.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny-llama}\nmodel_typo: 1\n")
    assert main(["train", str(path)]) == 2
    assert "unknown key 'model_typo'" in capsys.readouterr().err


def test_named_blend_fills_paths_and_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  blend:\n    - {name: kowiki, path: /d/kowiki, weight: 0.3}\n"
        "    - {name: web, path: /d/web, weight: 0.7}\n"
    )
    cfg = load_run_config(path)
    assert cfg.data.paths == ["/d/kowiki", "/d/web"] and cfg.data.weights == [0.3, 0.7]
    assert [e.name for e in cfg.data.blend] == ["kowiki", "web"]
    path.write_text("data:\n  blend:\n    - {name: kowiki, pth: /d/kowiki}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.blend\[0\].pth'.*'path'"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="not both"):
        load_run_config(None, ["data.paths=[/d/a]", "data.blend=[{path: /d/b}]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.seq_length=0", r"'data.seq_length' must be >= 1, got 0"),
        ("training.global_batch_size=0", r"'training.global_batch_size' must be >= 1, got 0"),
        ("training.micro_batch_size=-1", r"'training.micro_batch_size' must be >= 1, got -1"),
        ("logging.interval=0", r"'logging.interval' must be >= 1, got 0"),
        ("model.hidden_size=-64", r"'model.hidden_size' must be >= 1, got -64"),
        ("optimizer.beta1=1.5", r"'optimizer.beta1' must be in \[0, 1\), got 1.5"),
        ("checkpoint.save_interval=-1", r"'checkpoint.save_interval' must be >= 0, got -1"),
        ("data.weights=[0.5, 0]", r"'data.weights\[1\]' must be > 0, got 0.0"),
        ("data.replay_weights=[-1]", r"'data.replay_weights\[0\]' must be > 0, got -1.0"),
        ("data.blend=[{path: /d/a, weight: 0}]", r"'data.blend\[0\].weight' must be > 0, got 0.0"),
        ("optimizer.lr=.nan", r"'optimizer.lr' must be >= 0, got nan"),
        ("optimizer.lr=-1e-4", r"'optimizer.lr' must be >= 0, got -0.0001"),
        ("preemption.exit_code=256", r"'preemption.exit_code' must be in \[0, 255\], got 256"),
        ("profile.ranks=[0, -1]", r"'profile.ranks\[1\]' must be >= 0, got -1"),
        ("parallel.virtual_pipeline=0", r"'parallel.virtual_pipeline' must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, [override])


def test_range_applies_to_yaml_and_keeps_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  seq_length: 0\n")
    with pytest.raises(ConfigError, match=r"'data.seq_length' must be >= 1, got 0"):
        load_run_config(path)
    cfg = load_run_config(None, ["model.num_query_groups=null", "schedule.decay_steps=null", "data.weights=null"])
    assert cfg.model.num_query_groups is None and cfg.schedule.decay_steps is None


def _numeric_leaves(cls, prefix=""):
    """(dotted key, annotated type) of every int/float field in the tree, lists and Optionals included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    plain = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = plain[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        base = inner[0]
        if typing.get_origin(base) is list:
            base = typing.get_args(base)[0]
        if dataclasses.is_dataclass(base):
            yield from _numeric_leaves(base, f"{prefix}{f.name}.")
        elif base in (int, float):
            yield f"{prefix}{f.name}", hints[f.name]


def test_every_numeric_field_has_a_range_and_its_default_is_inside():
    from engine.config import Config, field_range

    leaves = list(_numeric_leaves(Config))
    assert len(leaves) > 50  # the walk reaches every section (and data.blend's entries)
    missing = [key for key, tp in leaves if field_range(tp) is None]
    assert not missing, f"numeric config fields without a Range in their type: {missing}"
    defaults = Config()
    for key, tp in leaves:
        value = defaults
        for part in key.split("."):
            value = getattr(value, part, None) if not isinstance(value, list) else None
        for v in value if isinstance(value, list) else [value]:
            assert v is None or field_range(tp).contains(v), f"default of {key} ({v}) is outside {field_range(tp)}"


def test_reference_shows_the_ranges():
    from engine.config_reference import reference_markdown

    text = reference_markdown()
    assert "| key | type | range | default | meaning |" in text
    assert "| `optimizer.beta1` | `float` | in [0, 1) | `0.9` |" in text
    assert "| `data.weights` | `Optional[List[float]]` | each > 0 |" in text
    assert "| `logging.interval` | `int` | >= 1 | `10` |" in text


def test_warmup_longer_than_run_or_decay_warns_but_runs(monkeypatch):
    from engine.config import ConfigWarning

    monkeypatch.delenv("RANK", raising=False)
    with pytest.warns(ConfigWarning, match=r"schedule.warmup_steps \(20\) exceeds training.steps \(10\)"):
        validate_run(_cfg("training.steps=10", "schedule.warmup_steps=20"), 1)
    with pytest.warns(ConfigWarning, match=r"schedule.warmup_steps \(5\) is not below schedule.decay_steps \(5\)"):
        validate_run(_cfg("training.steps=10", "schedule.warmup_steps=5", "schedule.decay_steps=5"), 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        validate_run(_cfg("training.steps=10", "schedule.warmup_steps=3"), 1)
        monkeypatch.setenv("RANK", "1")  # only rank 0 prints it
        validate_run(_cfg("training.steps=10", "schedule.warmup_steps=20"), 1)


def test_objective_names_are_the_registry_and_config_commands_stay_light():
    """``objective.name``'s Literal choices are exactly the objectives that can be built, and
    resolving a config (``engine config``, ``plan``, the launchers' dry runs) imports neither
    torch nor megatron-core (it took 4 s per command when it did)."""
    import subprocess
    import sys
    import typing

    from engine.config import ObjectiveConfig
    from engine.objectives import OBJECTIVES

    assert typing.get_args(typing.get_type_hints(ObjectiveConfig)["name"]) == tuple(OBJECTIVES)
    code = (
        "import sys; from engine.run_config import load_run_config, validate_run; "
        "cfg = load_run_config(None, ['model.preset=frankenstallm-3b', 'data.mock=true', 'precision.dtype=fp8']); "
        "validate_run(cfg, 8); "
        "heavy = [m for m in ('torch', 'megatron') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
