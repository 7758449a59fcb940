"""One way to extend the loop: a user's callback sees every hook in order with the metrics it
needs, can stop the run, and is told of errors; the built-in services are callbacks in the
order that keeps the run's events (log line, validation, checkpoint, stop) as they were."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from engine.callbacks import (
    Callback,
    CheckpointCallback,
    ConsoleLogger,
    EvaluationCallback,
    SourceShareCallback,
    build_callbacks,
)
from engine.config import load_config
from tests.conftest import REPO, base_config, step_metrics

# Runs in a fresh process (the trainer initialises torch.distributed and megatron-core's groups):
# a user callback records every hook; run "stop" asks to stop after step 3, run "error" raises
# in pre_optim_step of step 2.
SCRIPT = textwrap.dedent("""
    import json, math, sys
    from pathlib import Path

    from engine import process_guard
    from engine.callbacks import Callback
    from engine.run_config import load_run_config
    from engine.trainer import StopTraining, Trainer

    cfg_path, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    events = []

    class Recorder(Callback):
        def _ckpts(self, trainer):
            root = Path(trainer.cfg.checkpoint.dir) / "checkpoints"
            return sorted(p.name for p in root.glob("iter_*")) if root.is_dir() else []

        def on_train_start(self, trainer):
            events.append(["on_train_start"])

        def on_step_start(self, trainer, step):
            events.append(["on_step_start", step])

        def pre_optim_step(self, trainer, step, metrics):
            events.append(["pre_optim_step", step, math.isfinite(metrics["loss"]), "grad_norm" in metrics])
            if mode == "error" and step == 2:
                raise RuntimeError("boom in pre_optim_step")

        def record_metrics(self, trainer, step, metrics):
            events.append(["record_metrics", step, sorted(metrics)])

        def log_metrics(self, trainer, step, metrics, split="train"):
            events.append(["log_metrics", step, split, {k: v for k, v in metrics.items()}])

        def on_step_end(self, trainer, step, metrics):
            events.append(["on_step_end", step, self._ckpts(trainer)])
            if mode == "stop" and step == 3:
                trainer.request_stop(42, "user callback stops after step 3")

        def pre_train_end(self, trainer):
            events.append(["pre_train_end", self._ckpts(trainer)])

        def on_train_end(self, trainer):
            events.append(["on_train_end"])

        def on_error(self, trainer, exc):
            events.append(["on_error", type(exc).__name__, str(exc)])

    outcome = "finished"
    try:
        with process_guard.in_process_write_results():  # as `python -m engine train` saves
            Trainer(load_run_config(cfg_path), callbacks=[Recorder()]).fit()
    except StopTraining as exc:
        outcome = f"stop {exc.exit_code}"
    except RuntimeError as exc:
        outcome = f"raised {exc}"
    Path(out).write_text(json.dumps({"outcome": outcome, "events": events}))
""")


def _run(tmp_path: Path, cfg: dict, mode: str):
    run_dir = Path(cfg["checkpoint"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    script, out = tmp_path / "user_callback.py", run_dir / "events.json"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(run_dir / "config.yaml"), mode, str(out)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_user_callback_sees_every_hook_in_order_and_can_stop_the_run(tmp_path, synthetic_data):
    cfg = base_config(synthetic_data, tmp_path / "run")
    cfg["training"].update(steps=6, eval_interval=2, eval_steps=1)
    cfg["checkpoint"].update(save_interval=2, keep=0)
    result, stdout = _run(tmp_path, cfg, "stop")
    assert result["outcome"] == "stop 42"
    events = result["events"]
    names = [e[0] if e[0] != "log_metrics" else f"log_metrics:{e[2]}" for e in events]
    step = ["on_step_start", "pre_optim_step", "record_metrics", "log_metrics:train", "on_step_end"]
    assert names == (
        ["on_train_start"]
        + step
        + step[:4]
        + ["log_metrics:valid", "on_step_end"]
        + step
        + ["pre_train_end", "on_train_end"]
    )
    assert [e[1] for e in events if e[0] == "on_step_start"] == [1, 2, 3]
    assert all(e[2] and not e[3] for e in events if e[0] == "pre_optim_step")  # loss known, update not yet made

    train = {e[1]: e[3] for e in events if e[0] == "log_metrics" and e[2] == "train"}
    for s, m in train.items():
        # One flat dict: the objective's metrics, the step's, the counters and the throughput figures.
        for key in ("loss", "lr", "grad_norm", "step_time", "tokens_per_s", "tokens_per_s_per_gpu", "peak_mem_gib"):
            assert isinstance(m[key], float) and m[key] == m[key], (s, key)
        assert m["consumed_samples"] == 8 * s and m["skipped"] == 0 and m["skipped_total"] == 0
        assert m["mfu"] is None  # CPU: no peak to compare against
        assert not any(isinstance(v, dict) for v in m.values())
    # record_metrics of the user's callback (after the built-ins) already sees the throughput figures.
    assert "step_time" in next(e[2] for e in events if e[0] == "record_metrics")
    valid = [e for e in events if e[0] == "log_metrics" and e[2] == "valid"]
    assert [e[1] for e in valid] == [2] and "loss" in valid[0][3]

    # Checkpoint cadence: step 2's checkpoint exists by the end of step 2 (after validation);
    # the stop after step 3 is saved by the final checkpoint, before any on_train_end.
    ends = {e[1]: e[2] for e in events if e[0] == "on_step_end"}
    assert ends[1] == [] and ends[2] == ["iter_0000002"] and ends[3] == ["iter_0000002"]
    assert next(e for e in events if e[0] == "pre_train_end")[1] == ["iter_0000002", "iter_0000003"]
    assert [r["step"] for r in step_metrics(tmp_path / "run")] == [1, 2, 3]
    assert [r["step"] for r in step_metrics(tmp_path / "run", "valid")] == [2]

    # The console shows the same order: log line, validation, checkpoint.
    lines = stdout.splitlines()
    at = {
        key: next(i for i, ln in enumerate(lines) if ln.startswith(key))
        for key in ("step 2/6", "validation at step 2", "saved checkpoint", "step 3/6")
    }
    assert at["step 2/6"] < at["validation at step 2"] < at["saved checkpoint"] < at["step 3/6"]
    assert "iter_0000002" in lines[at["saved checkpoint"]]


def test_an_error_reaches_on_error_and_propagates(tmp_path, synthetic_data):
    cfg = base_config(synthetic_data, tmp_path / "run")
    cfg["training"]["steps"] = 4
    result, _ = _run(tmp_path, cfg, "error")
    assert result["outcome"] == "raised boom in pre_optim_step"
    names = [e[0] for e in result["events"]]
    assert names[-2:] == ["pre_optim_step", "on_error"]  # no end-of-run hooks after an error
    assert result["events"][-1][1:] == ["RuntimeError", "boom in pre_optim_step"]
    assert "on_train_end" not in names and "pre_train_end" not in names


def test_built_in_callbacks_and_their_order():
    cfg = load_config(None, ["profile.start_step=2", "profile.memory_snapshot_on_oom=true"])
    user = Callback()
    kinds = [type(cb).__name__ for cb in build_callbacks(cfg, [user])]
    assert kinds == [
        "EvaluationCallback",
        "PreemptionHandler",
        "ProfilerWindow",
        "OomSnapshot",
        "ThroughputCallback",
        "SourceShareCallback",
        "MetricsFileLogger",
        "ConsoleLogger",
        "CheckpointCallback",
        "Callback",
    ]
    assert build_callbacks(cfg, [user])[-1] is user


class _FakeTrainer:
    """What the small callbacks read of a trainer."""

    def __init__(self, steps=10, names=("arith", "other"), tokens=(30.0, 10.0)):
        self.cfg = load_config(None, [f"training.steps={steps}"])
        self.dataset_names = list(names)
        self.objective = type("Obj", (), {"log_keys": ("rewards/accuracies",)})()
        self.state = type("State", (), {"source_tokens": list(tokens)})()
        self.saves, self.stop_requested, self.logged = [], False, []
        self.evaluations = 0

    def save(self):
        self.saves.append("save")

    def evaluate(self):
        self.evaluations += 1
        return {"loss": 1.5, "ppl": 4.48, "rewards/accuracies": 0.5}

    def log_metrics(self, step, metrics, split="train"):
        self.logged.append((step, split, metrics))


def test_console_line_is_unchanged(capsys):
    trainer = _FakeTrainer()
    metrics = {
        "loss": 2.0,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "step_time": 0.25,
        "tokens_per_s": 2048.0,
        "tokens_per_s_per_gpu": 2048.0,
        "mfu": None,
        "peak_mem_gib": 1.0,
        "skipped_total": 0,
        "rewards/accuracies": 0.75,
    }
    SourceShareCallback().record_metrics(trainer, 3, metrics)
    assert metrics["share/arith"] == 0.75 and metrics["share/other"] == 0.25
    console = ConsoleLogger(interval=5)
    for step in (1, 2, 5, 10):
        console.log_metrics(trainer, step, metrics)
    console.log_metrics(trainer, 5, {"loss": 1.5, "ppl": 4.48, "rewards/accuracies": 0.5}, split="valid")
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" |")[0] for ln in lines] == [
        "step 1/10",
        "step 5/10",
        "step 10/10",
        "validation at step 5: loss 1.5000",
    ]
    assert lines[0] == (
        "step 1/10 | loss 2.0000 | lr 1.000e-03 | grad_norm 0.500 | step 0.250s | tok/s/gpu 2,048 | "
        "tok/s 2,048 | MFU n/a | peak mem 1.00 GiB | rewards/accuracies 0.7500 | "
        "share arith 75.0%, other 25.0%"
    )
    assert lines[3] == "validation at step 5: loss 1.5000 | ppl 4.4800 | rewards/accuracies 0.5000"


def test_evaluation_and_checkpoint_cadence():
    trainer = _FakeTrainer(steps=10)
    evaluation, ckpt = EvaluationCallback(4), CheckpointCallback(3)
    for step in range(1, 11):
        evaluation.on_step_end(trainer, step, {})
        ckpt.on_step_end(trainer, step, {})
    assert [(s, split) for s, split, _ in trainer.logged] == [(4, "valid"), (8, "valid"), (10, "valid")]
    assert len(trainer.saves) == 3  # steps 3, 6, 9; step 10 is the final save's
    ckpt.pre_train_end(trainer)
    assert len(trainer.saves) == 4
    trainer.stop_requested = True  # a stop after step 6: the final save writes it, once
    ckpt.on_step_end(trainer, 6, {})
    assert len(trainer.saves) == 4
    EvaluationCallback(0).on_step_end(trainer, 10, {})
    assert len(trainer.logged) == 3


def test_evaluation_at_start_logs_a_step_0_baseline_once():
    trainer = _FakeTrainer(steps=4)
    evaluation = EvaluationCallback(2, at_start=True)
    for step in range(1, 5):
        evaluation.on_step_start(trainer, step)
        evaluation.on_step_end(trainer, step, {})
    assert [(s, split) for s, split, _ in trainer.logged] == [(0, "valid"), (2, "valid"), (4, "valid")]
    resumed = _FakeTrainer(steps=4)  # a resumed run starts at step 3: no second baseline
    evaluation.on_step_start(resumed, 3)
    EvaluationCallback(0, at_start=True).on_step_start(resumed, 1)  # validation off: none at start either
    assert resumed.logged == []


def test_no_module_reaches_into_the_trainers_private_members():
    """The DPO reference pass and every other module use the trainer's public API."""
    offenders = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        if path.name == "trainer.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btrainer\._\w", line) or re.search(r"\btrainer\.model\s*=", line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
