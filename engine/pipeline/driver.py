"""Run the pipeline: print the plan with its time estimate, run (or skip) each stage, write the
report, and on a failed stage stop with its name, its error and its log."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Optional

from engine.config import ConfigError
from engine.pipeline.config import PipelineConfig
from engine.pipeline.runner import Runner, StageFailed
from engine.pipeline.stages import build_stages, rel


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_pipeline(
    cfg: PipelineConfig,
    force: bool = False,
    plan_only: bool = False,
    config_path: Optional[str] = None,
    stream: Optional[IO[str]] = None,
) -> int:
    """Run every stage of ``cfg`` under ``cfg.run.out``; 0 when all finished, 1 when one failed."""
    from engine.pipeline.report import write_report

    stream = stream if stream is not None else sys.stdout
    if not Path(cfg.run.corpus).is_file():
        raise ConfigError(f"run.corpus '{cfg.run.corpus}' is not a file")
    out = Path(cfg.run.out)
    stages = build_stages(cfg, out)
    runner = Runner(out, force=force, stream=stream)
    total = sum(s.estimate_s for s in stages)
    runner.say(
        f"pipeline: {len(stages)} stages from {cfg.run.corpus} to a chat model in {rel(out)} "
        f"({cfg.run.preset}, steps x {cfg.run.steps_scale:g}); estimate {_minutes(total)} on a 2-core CPU "
        f"when nothing is finished yet"
    )
    for i, s in enumerate(stages, 1):
        runner.say(f"  {i}. {s.name:<9} {s.title} (~{_minutes(s.estimate_s)})")
    if plan_only:
        return 0
    start = time.monotonic()
    failed: Optional[StageFailed] = None
    spent = estimated = 0.0
    for i, s in enumerate(stages, 1):
        try:
            record = runner.run(s, i, len(stages))
        except StageFailed as exc:
            failed = exc
            break
        if record["status"] == "ran" and i < len(stages):
            # Re-estimate what is left at the pace measured so far on this machine (a loaded
            # machine runs every stage slower by about the same factor).
            spent, estimated = spent + record["seconds"], estimated + s.estimate_s
            left = spent / estimated * sum(x.estimate_s for x in stages[i:])
            runner.say(f"  ~{_minutes(left)} left at the measured pace ({spent / estimated:.1f} x the estimate)")
    elapsed = time.monotonic() - start
    report = write_report(cfg, out, stages, runner.results, elapsed, failed, config_path)
    if failed is not None:
        print(f"pipeline stopped: {failed}", file=sys.stderr)
        runner.say(f"report of the finished stages: {rel(report)}")
        return 1
    ran = sum(1 for r in runner.results.values() if r["status"] == "ran")
    runner.say(f"pipeline finished in {_minutes(elapsed)} ({ran} stage(s) ran, {len(stages) - ran} skipped)")
    runner.say(f"report: {rel(report)} (and report.html, report.json)")
    return 0
