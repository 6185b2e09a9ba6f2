"""The session-end check: no process this test run started may outlive it.

A process counts as this run's when it was created after the run started, did not exist then, and is
tied to the run: a descendant of the pytest process, or carrying the run's marker variable in its
environment, or working (cwd) inside the run's temp dir. The last one catches the CLI processes of a
killed ``agentd run`` subprocess: the daemon scrubs its environment and they are re-parented to init,
but they still work in the test's data dir. (Command lines are no tie: a CLI's sandbox rules name
other runs' temp dirs too.)
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

# Not AGENTD_*: that prefix is the daemon's own config namespace.
MARKER = "PYTEST_AGENTD_RUN"
WATCHED = frozenset({"claude", "socat", "redis-server", "dovecot"})


@dataclass(frozen=True)
class RunSnapshot:
    marker: str
    basetemp: Path
    root_pid: int
    started_at: float
    preexisting: frozenset[tuple[int, float]]

    @classmethod
    def take(cls, basetemp: Path, marker: str) -> RunSnapshot:
        """What runs now, so only processes started later can count as this run's."""
        # create_time derives from a boot time in whole seconds: start early, the snapshot covers the overlap.
        started_at = time.time() - 2
        existing = frozenset(
            (p.pid, p.info["create_time"]) for p in psutil.process_iter(["create_time"]) if p.info["create_time"]
        )
        return cls(marker, basetemp.resolve(), os.getpid(), started_at, existing)

    def leaks(self, names: frozenset[str] = WATCHED) -> list[psutil.Process]:
        """Live processes named in ``names`` that this run started."""
        found = []
        for proc in psutil.process_iter(["name", "create_time", "status"]):
            info = proc.info
            if info["name"] not in names or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (proc.pid, info["create_time"]) in self.preexisting or (info["create_time"] or 0) < self.started_at:
                continue
            with contextlib.suppress(psutil.Error):
                if self._tied(proc):
                    found.append(proc)
        return found

    def _tied(self, proc: psutil.Process) -> bool:
        if any(parent.pid == self.root_pid for parent in proc.parents()):
            return True
        with contextlib.suppress(psutil.AccessDenied):
            if proc.environ().get(MARKER) == self.marker:
                return True
        with contextlib.suppress(psutil.AccessDenied):
            return Path(proc.cwd()).resolve().is_relative_to(self.basetemp)
        return False


def mark_environment() -> str:
    """A fresh marker for this run in ``os.environ``; every process started from here inherits it."""
    marker = os.environ[MARKER] = uuid.uuid4().hex
    return marker


def describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"pid {proc.pid} ppid {proc.ppid()} cwd {proc.cwd()}: {' '.join(proc.cmdline())[:300]}"
    return f"pid {proc.pid} (gone)"


def settle(procs: list[psutil.Process], timeout: float = 3.0) -> list[psutil.Process]:
    """Those still alive after ``timeout``: a process a teardown just signalled gets a moment to exit."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if _running(p)]


def kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
