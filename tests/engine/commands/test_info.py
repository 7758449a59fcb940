"""`engine info` / `engine plan` targets: a misspelt preset is a one-line error listing the presets."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "command, target, close",
    [
        ("info", "tiny-lama", "'tiny-llama'"),
        ("plan", "frankenstalm-3b", "'frankenstallm-3b'"),
    ],
)
def test_unknown_preset_lists_presets_and_the_close_match(command, target, close, capsys):
    from engine.cli import main
    from models.presets import PRESETS

    assert main([command, target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{target}' is neither a model preset nor a config file. Did you mean {close}" in err
    assert ", ".join(PRESETS) in err


def test_missing_config_file_still_lists_presets(tmp_path, capsys):
    from engine.cli import main

    assert main(["info", str(tmp_path / "nosuch.yaml")]) == 2
    assert "Presets: frankenstallm-3b" in capsys.readouterr().err
