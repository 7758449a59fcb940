"""The stage runner on stages made of small Python commands: skip when finished, rerun when an
input, a setting or a command changes or with force, failures naming the stage and its log,
outputs of a rerun stage removed first; the progress lines readable in a log file."""

from __future__ import annotations

import io
import json
import sys

import pytest

from engine.pipeline.progress import StageProgress
from engine.pipeline.runner import Runner, Stage, StageFailed, stage_hash


def _copy_stage(src, dst, settings=None):
    """A stage that copies ``src`` to ``dst`` and counts its runs in ``dst.runs``."""
    code = (
        "import sys, pathlib; s, d = map(pathlib.Path, sys.argv[1:]); d.write_text(s.read_text()); "
        "c = d.with_suffix('.runs'); c.write_text(str(int(c.read_text()) + 1 if c.exists() else 1)); print('copied')"
    )
    return Stage(
        "copy",
        "copy a file",
        [[sys.executable, "-c", code, str(src), str(dst)]],
        inputs=[src],
        outputs=[dst],
        settings=settings or {},
        summarize=lambda: f"{len(dst.read_text())} chars",
    )


def _runs(dst):
    return int(dst.with_suffix(".runs").read_text())


def test_skip_rerun_on_change_and_force(tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out" / "copy.txt"
    dst.parent.mkdir()
    src.write_text("abc")
    out = io.StringIO()
    runner = Runner(tmp_path / "run", stream=out, poll_s=0.05)
    assert runner.run(_copy_stage(src, dst), 1, 1)["status"] == "ran"
    assert "[1/1] copy: done in" in out.getvalue() and "3 chars" in out.getvalue()
    assert (tmp_path / "run" / "logs" / "copy.log").read_text().splitlines()[-1] == "copied"

    record = Runner(tmp_path / "run", stream=io.StringIO()).run(_copy_stage(src, dst), 1, 1)
    assert record["status"] == "skipped" and record["summary"] == "3 chars" and _runs(dst) == 1

    src.write_text("abcd")  # a changed input reruns the stage
    assert Runner(tmp_path / "run", stream=io.StringIO()).run(_copy_stage(src, dst), 1, 1)["status"] == "ran"
    assert dst.read_text() == "abcd" and _runs(dst) == 2

    changed = _copy_stage(src, dst, settings={"lr": 1e-3})  # so does a changed setting
    assert stage_hash(changed) != stage_hash(_copy_stage(src, dst))
    assert Runner(tmp_path / "run", stream=io.StringIO()).run(changed, 1, 1)["status"] == "ran"
    assert Runner(tmp_path / "run", stream=io.StringIO()).run(changed, 1, 1)["status"] == "skipped"

    assert Runner(tmp_path / "run", force=True, stream=io.StringIO()).run(changed, 1, 1)["status"] == "ran"
    assert _runs(dst) == 4

    dst.unlink()  # an output gone: the marker alone does not make the stage finished
    assert Runner(tmp_path / "run", stream=io.StringIO()).run(changed, 1, 1)["status"] == "ran"


def test_failed_stage_names_itself_and_its_log_and_leaves_no_marker(tmp_path):
    stale = tmp_path / "result"
    stale.mkdir()
    (stale / "old.bin").write_text("from an earlier run")
    fail = Stage(
        "broken",
        "fails",
        [[sys.executable, "-c", "import sys; print('working'); sys.exit('error: corpus line 3 is not JSON')"]],
        outputs=[stale],
    )
    runner = Runner(tmp_path / "run", stream=io.StringIO(), poll_s=0.05)
    with pytest.raises(StageFailed) as exc:
        runner.run(fail, 2, 5)
    log = tmp_path / "run" / "logs" / "broken.log"
    assert exc.value.stage == "broken" and exc.value.log == log
    assert str(exc.value) == f"stage 'broken' failed: exit 1: error: corpus line 3 is not JSON (log: {log})"
    assert not stale.exists()  # the old output was removed before the rerun, not left to pass for a new one
    assert not (tmp_path / "run" / ".done" / "broken.json").exists()

    silent = Stage("quiet", "writes nothing", [[sys.executable, "-c", "pass"]], outputs=[tmp_path / "never"])
    with pytest.raises(StageFailed, match="stage 'quiet' failed: finished without writing"):
        runner.run(silent, 1, 1)


def test_progress_lines_follow_metrics_without_carriage_returns(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    stream = io.StringIO()  # not a tty: plain lines
    prog = StageProgress("pretrain", tmp_path / "x.log", metrics=metrics, total=10, stream=stream, line_interval=0)
    prog.poll()
    rows = [{"step": s, "split": "train", "loss": 9.0 - s, "tokens_per_s": 1234.0} for s in (1, 2, 3)]
    with open(metrics, "w") as f:  # the last record half-written: read on the next poll
        f.write("\n".join(json.dumps(r) for r in rows[:2]) + "\n" + json.dumps(rows[2])[:10])
    prog.poll()
    assert prog.step == 2 and prog.last["loss"] == 7.0
    with open(metrics, "a") as f:
        f.write(json.dumps(rows[2])[10:] + "\n" + json.dumps({"step": 3, "split": "valid", "loss": 1.0}) + "\n")
    prog.poll()
    prog.close()
    text = stream.getvalue()
    assert "\r" not in text
    assert "pretrain: step 3/10 | loss 6.0000 | tok/s 1,234" in text.splitlines()[-1]

    log = tmp_path / "export.log"
    log.write_text("loading\rparity: 45%|####\rparity: 90%|#########\n")
    other = StageProgress("export", log, stream=io.StringIO(), line_interval=0)
    assert other.status() == "parity: 90%|#########"
