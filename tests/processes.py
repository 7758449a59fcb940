"""Jobs started in their own session, as clusters start them, and the check that none of
their processes outlives them (shared by the signal, launcher and chaos tests)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import List

import psutil

from tests.conftest import REPO


class Job:
    """A process started in its own session, its output collected by a thread, its
    descendants remembered (so the test can tell that none survives)."""

    def __init__(self, cmd: List[str], env: dict):
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: List[str] = []
        self.seen: dict = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def remember_tree(self) -> None:
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen[p.pid] = p
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, text: str, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.remember_tree()
            if text in self.out:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not seen:\n{self.out[-3000:]}")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {timeout} s after the signal:\n{self.out[-3000:]}") from None

    def kill_all(self) -> None:
        """Cleanup for a failed test: nothing of this job may keep running."""
        self.remember_tree()
        for p in [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []:
            p.kill()
        for p in self.seen.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def survivors(job: Job, run_dir: Path, since: float, timeout: float = 20) -> List[str]:
    """Processes of the job still alive ``timeout`` s after it ended: its remembered descendants,
    anything naming the run directory, and multiprocessing helpers (manager, resource tracker)
    started since the test began and now orphaned."""
    deadline = time.time() + timeout
    while True:
        alive = []
        for p in list(job.seen.values()):
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "status"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["create_time"] < since - 1 or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            orphan_helper = p.info["ppid"] == 1 and "multiprocessing" in cmd
            if (str(run_dir) in cmd or orphan_helper) and p.info["pid"] not in job.seen:
                alive.append(f"{p.info['pid']} {cmd[:120]}")
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)
