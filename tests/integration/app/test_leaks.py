"""The session-end leak check itself, on planted ``sleep`` processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import leaks

SLEEP = frozenset({"sleep"})


@pytest.fixture
def planted() -> Iterator[list[psutil.Process]]:
    procs: list[psutil.Process] = []
    yield procs
    leaks.kill(procs)


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != leaks.MARKER}


def orphan_sleep(cwd: Path, env: dict[str, str], sleep: str = "sleep 120") -> psutil.Process:
    """A ``sleep`` whose parent has exited, so it is re-parented like a killed daemon's CLI."""
    command = ["sh", "-c", f"{sleep} >/dev/null 2>&1 & echo $!"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return execed(psutil.Process(int(result.stdout)))


def execed(proc: psutil.Process) -> psutil.Process:
    """``proc`` once it runs ``sleep``: right after the fork it is still a shell."""
    deadline = time.monotonic() + 10
    while proc.name() != "sleep":
        assert time.monotonic() < deadline, "sleep did not start"
        time.sleep(0.01)
    return proc


def test_finds_this_runs_processes_and_ignores_strangers(tmp_path: Path, planted: list[psutil.Process]) -> None:
    basetemp = tmp_path / "basetemp"
    (basetemp / "data" / "work").mkdir(parents=True)
    planted.append(before := orphan_sleep(basetemp, plain_env()))
    snapshot = leaks.RunSnapshot.take(basetemp, marker="run-under-test")
    # The run's root stands in for pytest (which may be a subreaper, adopting every orphan planted here).
    root = subprocess.Popen(["sh", "-c", "sleep 120 & wait"], cwd="/", env=plain_env())
    snapshot = dataclasses.replace(snapshot, root_pid=root.pid)
    try:
        in_workdir = orphan_sleep(basetemp / "data" / "work", plain_env())
        # Naming another run's temp dir (as a CLI's sandbox rules do) is no tie.
        shutil.copy("/bin/sleep", basetemp / "sleep")
        named = orphan_sleep(Path("/"), plain_env(), f"{basetemp / 'sleep'} 120")
        with_marker = orphan_sleep(Path("/"), {**plain_env(), leaks.MARKER: "run-under-test"})
        stranger = orphan_sleep(Path("/"), {**plain_env(), leaks.MARKER: "another-run"})
        planted.extend([in_workdir, named, with_marker, stranger])
        descendant = wait_for_child(root.pid)
        assert before.is_running() and named.is_running()

        found = {p.pid for p in snapshot.leaks(SLEEP)}

        assert found == {in_workdir.pid, with_marker.pid, descendant.pid}
        assert snapshot.leaks(frozenset({"claude"})) == []
    finally:
        leaks.kill([psutil.Process(root.pid), *psutil.Process(root.pid).children()])
        root.wait()


def wait_for_child(pid: int) -> psutil.Process:
    deadline = time.monotonic() + 10
    while not (children := psutil.Process(pid).children()):
        assert time.monotonic() < deadline, "the root's child did not start"
        time.sleep(0.01)
    return execed(children[0])


def test_settle_drops_processes_that_exit_and_kill_ends_the_rest(planted: list[psutil.Process]) -> None:
    quick = subprocess.Popen(["sleep", "0.2"])
    slow = orphan_sleep(Path("/"), plain_env())
    planted.append(slow)
    try:
        still = leaks.settle([psutil.Process(quick.pid), slow], timeout=1.0)
    finally:
        quick.wait()
    assert [p.pid for p in still] == [slow.pid]
    leaks.kill(still)
    assert not slow.is_running()
