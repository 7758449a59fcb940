"""Progress of a running stage, watched from the parent: a tqdm bar on a terminal, plain
lines in a log file (no carriage returns).

A training stage's bar follows the child's ``metrics.jsonl`` (step, loss, tok/s); any other
stage's shows the elapsed time and the last line its command printed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, Optional


def _last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log (the tail of a tqdm line after its last ``\\r``)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r") if seg.strip()]
    return lines[-1][:100] if lines else ""


class StageProgress:
    """Progress of one stage, polled by the runner (``poll()``) while the stage's process runs.

    ``metrics``: the child's ``metrics.jsonl`` (training stages) and ``total`` its step count;
    otherwise ``log`` is followed. On a terminal the bar redraws at most once a second; when
    ``stream`` is not a tty it prints one plain line every ``line_interval`` seconds."""

    def __init__(
        self,
        name: str,
        log: Path,
        metrics: Optional[Path] = None,
        total: Optional[int] = None,
        stream: Optional[IO[str]] = None,
        line_interval: float = 15.0,
    ):
        self.name, self.log, self.metrics, self.total = name, log, metrics, total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.line_interval = line_interval
        self.start = time.monotonic()
        self._last_print = self.start
        self._offset = 0
        self._buffer = ""
        self.step = 0
        self.first: Optional[tuple] = None  # (time, step) of the first record: the rate excludes start-up
        self.last: Dict[str, Any] = {}
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=name, unit="step" if metrics else "s", file=self.stream, mininterval=1.0, leave=False
            )

    def _read_metrics(self) -> None:
        """Fold the records appended to metrics.jsonl since the last poll into ``step``/``last``."""
        if self.metrics is None or not self.metrics.is_file():
            return
        with open(self.metrics, encoding="utf-8") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split("\n")
        for line in complete:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("split") == "train":
                self.step = max(self.step, int(rec["step"]))
                self.last = rec
                if self.first is None:
                    self.first = (time.monotonic(), self.step)

    def status(self) -> str:
        """What the bar shows after the counter: loss and tok/s, or the command's last line."""
        if self.metrics is not None:
            if not self.last:
                return "starting"
            return f"loss {self.last['loss']:.4f} | tok/s {self.last.get('tokens_per_s', 0):,.0f}"
        return _last_line(self.log)

    def poll(self) -> None:
        """Read what the stage wrote since the last call and update the bar or print a line."""
        self._read_metrics()
        now = time.monotonic()
        if self._bar is not None:
            if self.metrics is not None:
                self._bar.update(self.step - self._bar.n)
            else:
                self._bar.update(int(now - self.start) - self._bar.n)
            self._bar.set_postfix_str(self.status(), refresh=False)
            return
        if now - self._last_print >= self.line_interval:
            self._last_print = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The plain progress line written when the output is not a terminal."""
        elapsed = now - self.start
        if self.metrics is not None and self.total:
            left = ""
            if self.first is not None and self.step > self.first[1]:
                rate = (now - self.first[0]) / (self.step - self.first[1])
                left = f", ~{(self.total - self.step) * rate:.0f} s left"
            return f"  {self.name}: step {self.step}/{self.total} | {self.status()} | {elapsed:.0f} s{left}"
        return f"  {self.name}: {elapsed:.0f} s | {self.status()}"

    def close(self) -> None:
        """Remove the bar (the runner prints the stage's summary line instead)."""
        self._read_metrics()
        if self._bar is not None:
            self._bar.close()
