"""The quickstart pipeline (examples/quickstart.sh -> `python -m engine pipeline
examples/configs/quickstart.yaml`): the whole chain at a small step scale, asserted on
report.json; a re-run skips every stage; a corrupted corpus stops it non-zero naming the stage."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "examples/configs/quickstart.yaml"
STAGES = ["tokenizer", "data", "pretrain", "sft", "orpo", "export", "gguf", "generate", "eval"]


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", "pipeline", CONFIG, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_quickstart_script_runs_the_pipeline_config():
    script = (REPO / "examples" / "quickstart.sh").read_text()
    assert f'python -m engine pipeline {CONFIG} "$@"' in script


def test_corrupted_corpus_stops_the_pipeline_naming_the_stage(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(REPO / "examples" / "data" / "sample.jsonl", corpus)
    with open(corpus, "a") as f:
        f.write('{"text": "an unterminated string\n')
    out = tmp_path / "out"
    proc = _pipeline("--out", str(out), "--corpus", str(corpus))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    log = out / "logs" / "data.log"
    # The tokenizer trains (it skips what it cannot read); preprocessing refuses the bad record.
    assert "[1/" in proc.stdout and "tokenizer: done in" in proc.stdout
    assert f"pipeline stopped: stage 'data' failed: exit 1: error: {corpus}:line 297: malformed_json" in proc.stderr
    assert f"(log: {log})" in proc.stderr
    assert "malformed_json" in log.read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["failed"]["stage"] == "data"
    assert report["stages"]["pretrain"]["status"] == "not run"
    assert not (out / "pretrain").exists()


def test_missing_corpus_and_bad_key_are_config_errors(tmp_path):
    proc = _pipeline("--out", str(tmp_path), "--corpus", str(tmp_path / "none.jsonl"))
    assert proc.returncode == 2 and f"config error: run.corpus '{tmp_path / 'none.jsonl'}' is not a file" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  stepz: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "pipeline", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown key 'pretrain.stepz'. Did you mean 'steps'?" in proc.stderr


@pytest.mark.slow  # the whole chain at steps x 0.25: ~4 min on the 2-core machine
def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = _pipeline("--out", str(out), "--steps-scale", "0.25")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\r" not in proc.stdout + proc.stderr  # progress lines, not a redrawn bar, off a tty
    report = json.loads((out / "report.json").read_text())
    assert list(report["stages"]) == STAGES
    assert all(s["status"] == "ran" for s in report["stages"].values())

    pre = [loss for _, loss in report["training"]["pretrain"]["train_loss"]]
    assert len(pre) == 50 and all(loss is not None and math.isfinite(loss) for loss in pre)
    assert sum(pre[-5:]) / 5 < sum(pre[:5]) / 5 - 0.5  # falling, not noise

    share = report["training"]["sft"]["replay_share"]
    assert abs(share[-1][1] - 0.3) < 0.02

    acc = report["training"]["orpo"]["heldout_accuracy"]
    assert acc[0][0] == 0 and acc[-1][1] > acc[0][1]  # baseline before the first step, then above it

    assert report["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    from gguf import GGUFReader

    gguf = GGUFReader(report["gguf"]["file"])
    assert len(gguf.tensors) == report["gguf"]["tensors"] > 0

    html = (out / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == len(report["plots"]) >= 3

    again = _pipeline("--out", str(out), "--steps-scale", "0.25")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished earlier, skipped") == len(STAGES)
    assert f"0 stage(s) ran, {len(STAGES)} skipped" in again.stdout
