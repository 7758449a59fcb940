"""`python -m engine eval --sweep`: a run's checkpoints in one table, JSON and PNG; bad input."""

from __future__ import annotations

import json

import pytest

from engine.config import ConfigError
from engine.evaluation.evaluate import EvalOptions, evaluate_checkpoint, sweep_run


def test_sweep_table_json_and_plot(two_checkpoints, tmp_path):
    """What `eval --sweep RUN --out DIR` writes (the command's steps, in-process: a CLI
    subprocess would cost seconds of imports)."""
    import matplotlib.image

    from engine.evaluation import report
    from engine.evaluation.evaluate import sweep_run

    run, first, second = two_checkpoints
    out = tmp_path / "sweep"
    sweep = sweep_run(run, EvalOptions(max_tokens=256))
    report.write_report(out, "sweep", sweep, report.sweep_markdown(sweep))
    report.sweep_plot(sweep, out / "sweep.png")
    expected = [
        evaluate_checkpoint(c, EvalOptions(max_tokens=256))["perplexity"][0]["perplexity"] for c in (first, second)
    ]
    data = json.loads((out / "sweep.json").read_text())
    assert [c["iteration"] for c in data["checkpoints"]] == [1, 2]
    assert [c["perplexity"][0]["perplexity"] for c in data["checkpoints"]] == pytest.approx(expected)
    table = (out / "sweep.md").read_text().splitlines()
    assert table[2] == "| iteration | pretrain ppl (valid) |"
    assert table[4:] == [f"| 1 | {expected[0]:.3f} |", f"| 2 | {expected[1]:.3f} |"]
    height, width, _ = matplotlib.image.imread(out / "sweep.png").shape
    assert height > 300 and width > 500
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]


def test_sweep_of_a_run_without_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        sweep_run(tmp_path, EvalOptions())


def test_eval_needs_exactly_one_target(capsys):
    from engine.cli import main

    assert main(["eval"]) == 2
    assert main(["eval", "ckpt", "--sweep", "run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: give exactly one of CHECKPOINT, --compare A B or --sweep RUN_DIR"] * 2
