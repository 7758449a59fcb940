"""The stage runner: each stage is a list of engine commands with declared inputs and outputs.

A stage runs its commands as subprocesses (cwd: the repository root, output appended to
``OUT/logs/<stage>.log``), then writes a done-marker ``OUT/.done/<stage>.json`` holding the
hash of everything it was made from: its commands, its settings and the bytes of its input
files. A later run skips a stage whose marker matches and whose outputs exist; a changed input,
setting or command reruns it, and so does ``force``. Outputs of a stage that reruns are removed
first (a training run refuses a checkpoint directory holding newer checkpoints, and a stale
file must never pass for a fresh one). A failing command stops the pipeline: ``StageFailed``
names the stage, the exit code, the last error line and the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

from engine.pipeline.progress import StageProgress

REPO = Path(__file__).resolve().parents[2]


class StageFailed(RuntimeError):
    """A stage's command exited non-zero (or its outputs are missing after it ran)."""

    def __init__(self, stage: str, message: str, log: Path):
        super().__init__(f"stage '{stage}' failed: {message} (log: {log})")
        self.stage, self.log = stage, log


@dataclass
class Stage:
    """One step of the pipeline."""

    name: str
    """Short name: the log is ``logs/<name>.log``, the marker ``.done/<name>.json``."""
    title: str
    """What it does, in a few words (printed in the plan)."""
    commands: List[List[str]]
    """argv lists run in order from the repository root."""
    inputs: List[Path] = field(default_factory=list)
    """Files or directories whose bytes the stage is made from."""
    outputs: List[Path] = field(default_factory=list)
    """What it writes: must exist after it ran; removed before it reruns."""
    settings: Dict[str, Any] = field(default_factory=dict)
    """Settings hashed into the marker besides the commands (e.g. the stage's resolved config)."""
    estimate_s: float = 10.0
    """Expected wall time on this kind of machine (the plan's estimate)."""
    metrics: Optional[Path] = None
    """A training stage's metrics.jsonl, followed for the progress bar."""
    steps: Optional[int] = None
    """A training stage's step count (the bar's total)."""
    prepare: Optional[Callable[[], None]] = None
    """Called before the commands (e.g. writes the stage's config file)."""
    summarize: Optional[Callable[[], str]] = None
    """The one-line summary printed after the stage (read from its outputs)."""


def _hash_path(h: "hashlib._Hash", path: Path) -> None:
    """Fold a file's or a directory tree's relative names and bytes into ``h``."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        h.update(f"missing:{path}".encode())
        return
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def stage_hash(stage: Stage) -> str:
    """Hash of a stage's commands, settings and input bytes (what its done-marker records)."""
    h = hashlib.sha256()
    commands = [command_line(c) for c in stage.commands]
    h.update(json.dumps({"commands": commands, "settings": stage.settings}, sort_keys=True, default=str).encode())
    for p in stage.inputs:
        _hash_path(h, Path(p))
    return h.hexdigest()


def command_line(argv: Sequence[str]) -> str:
    """A command as a user types it from the repository root (this interpreter as ``python``,
    the one of the activated environment)."""
    return " ".join(shlex.quote("python" if i == 0 and a == sys.executable else a) for i, a in enumerate(argv))


def _child_env() -> Dict[str, str]:
    """The children import this tree's engine (not an installed copy) and keep one BLAS thread
    per process unless the user chose otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _error_line(log: Path) -> str:
    """The most telling line of a failed command's log: the last error-looking one."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        low = line.lower()
        if "error" in low or "exception" in low or "failed" in low:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


class Runner:
    """Runs stages in order under ``out``, skipping finished ones (see the module docstring)."""

    def __init__(self, out: Path, force: bool = False, stream: Optional[IO[str]] = None, poll_s: float = 0.5):
        self.out = Path(out)
        self.force = force
        self.stream = stream if stream is not None else sys.stdout
        self.poll_s = poll_s
        self.logs = self.out / "logs"
        self.markers = self.out / ".done"
        self.results: Dict[str, Dict[str, Any]] = {}

    def say(self, text: str) -> None:
        """Print a line of the pipeline's own output."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def marker(self, stage: Stage) -> Path:
        """The stage's done-marker."""
        return self.markers / f"{stage.name}.json"

    def is_done(self, stage: Stage, digest: str) -> bool:
        """Whether a previous run finished ``stage`` from the same inputs and its outputs remain."""
        m = self.marker(stage)
        if self.force or not m.is_file():
            return False
        try:
            recorded = json.loads(m.read_text())
        except (OSError, ValueError):
            return False
        return recorded.get("hash") == digest and all(Path(p).exists() for p in stage.outputs)

    def run(self, stage: Stage, index: int, count: int) -> Dict[str, Any]:
        """Run (or skip) one stage; returns its record (status, seconds, summary, commands, log)."""
        log = self.logs / f"{stage.name}.log"
        head = f"[{index}/{count}] {stage.name}"
        if stage.prepare is not None:
            stage.prepare()
        digest = stage_hash(stage)
        record: Dict[str, Any] = {
            "commands": [command_line(c) for c in stage.commands],
            "log": str(log),
            "estimate_s": stage.estimate_s,
        }
        if self.is_done(stage, digest):
            previous = json.loads(self.marker(stage).read_text())
            record.update(status="skipped", seconds=previous.get("seconds"), summary=previous.get("summary", ""))
            self.say(f"{head}: finished earlier, skipped ({record['summary']})")
            self.results[stage.name] = record
            return record
        self.marker(stage).unlink(missing_ok=True)
        for p in stage.outputs:
            if Path(p).is_dir():
                shutil.rmtree(p)
            elif Path(p).exists():
                Path(p).unlink()
        self.logs.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        start = time.monotonic()
        progress = StageProgress(stage.name, log, stage.metrics, stage.steps, stream=self.stream)
        try:
            for argv in stage.commands:
                self._run_command(stage, argv, log, progress)
        finally:
            progress.close()
        missing = [str(p) for p in stage.outputs if not Path(p).exists()]
        if missing:
            raise StageFailed(stage.name, f"finished without writing {', '.join(missing)}", log)
        seconds = time.monotonic() - start
        summary = stage.summarize() if stage.summarize is not None else ""
        record.update(status="ran", seconds=seconds, summary=summary)
        self.markers.mkdir(parents=True, exist_ok=True)
        tmp = self.marker(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps({"hash": digest, "seconds": seconds, "summary": summary}, indent=1))
        tmp.replace(self.marker(stage))
        self.say(f"{head}: done in {seconds:.0f} s (estimate {stage.estimate_s:.0f} s): {summary}")
        self.results[stage.name] = record
        return record

    def _run_command(self, stage: Stage, argv: List[str], log: Path, progress: StageProgress) -> None:
        """Run one command with its output appended to ``log``, polling the progress meanwhile."""
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {command_line(argv)}\n")
            f.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env=_child_env(), stdout=f, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    progress.poll()
                    time.sleep(self.poll_s)
            except BaseException:
                # Ctrl-C or an error in the parent: the child must not outlive the pipeline.
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if proc.returncode != 0:
            raise StageFailed(stage.name, f"exit {proc.returncode}: {_error_line(log)}", log)
