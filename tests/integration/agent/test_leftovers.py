"""A daemon's CLI processes and their helpers never outlive it: they die with it, and a restart sweeps the rest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from bot import procs
from tests.fakes.model import FakeModel
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import gone, wait_until

SANDBOX = "sandbox = true\n"


def tree(daemon: DaemonProcess) -> list[psutil.Process]:
    assert daemon.process is not None
    return [p for p in psutil.Process(daemon.process.pid).children(recursive=True) if not gone(p)]


def named(processes: list[psutil.Process], name: str) -> list[psutil.Process]:
    return [p for p in processes if not gone(p) and p.name() == name]


@pytest.fixture
async def daemon(tmp_path: Path, fake_model: FakeModel) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path, fake_model.url, toml=SANDBOX)
    yield proc
    proc.kill()


async def test_cli_and_its_sandbox_helper_die_with_the_daemon(daemon: DaemonProcess, fake_model: FakeModel) -> None:
    # Mid-turn is the worst case: the CLI is busy retrying its dead gateway and does not notice its stdin close.
    fake_model.add("slow", text="never sent", delay_s=60)
    await daemon.start()
    in_flight = asyncio.create_task(daemon.ask("c", "slow"))
    await wait_until(lambda: bool(fake_model.find("slow")), what="the slow turn to reach the model")
    await wait_until(lambda: bool(named(tree(daemon), "socat")), what="the CLI's sandbox helper")
    members = tree(daemon)
    assert named(members, "claude")
    # The mark a restart sweeps by (see below) is on the CLI and on the helpers it starts.
    assert all(p.environ()["AGENTD_OWNER"].endswith(f":{daemon.data_dir}") for p in members)
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait(10)
    with contextlib.suppress(Exception):
        await in_flight
    await wait_until(
        lambda: all(gone(p) for p in members),
        timeout=10,
        what=f"{[(p.pid, p.name()) for p in members if not gone(p)]} to die with the daemon",
    )


def plant(data_dir: Path, owner: str) -> subprocess.Popen[bytes]:
    """A stand-in for a CLI or helper the parent-death signal missed: a process carrying an owner mark."""
    env = {"PATH": os.environ["PATH"], "AGENTD_OWNER": f"{owner}:{data_dir}"}
    return subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)


async def test_a_restart_reaps_what_a_dead_daemon_of_its_data_dir_left(daemon: DaemonProcess, tmp_path: Path) -> None:
    me = psutil.Process()
    # Our own pid with another start time: the daemon that started it is dead and its pid was reused.
    leftover = plant(daemon.data_dir, f"{me.pid}:1.00")
    running_owner = plant(daemon.data_dir, f"{me.pid}:{me.create_time():.2f}")  # a daemon that still runs
    other_dir = plant((tmp_path / "elsewhere").resolve(), f"{me.pid}:1.00")  # another data dir's
    planted = [leftover, running_owner, other_dir]
    try:
        await daemon.start()
        await wait_until(lambda: leftover.poll() is not None, timeout=10, what="the leftover to be reaped")
        assert running_owner.poll() is None and other_dir.poll() is None, "only this data dir's dead owners"
        events = [json.loads(line) for line in daemon.log.read_text().splitlines() if "leftovers_reaped" in line]
        assert events and events[0]["processes"] == [f"{leftover.pid} sleep"], events
    finally:
        for proc in planted:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("mark", ["", "garbage", "x:1.00", ":1.00", "-1:1.00", "1.00"])
def test_a_malformed_owner_mark_is_left_alone(tmp_path: Path, mark: str) -> None:
    data_dir = tmp_path.resolve()
    planted = plant(data_dir, mark)
    try:
        assert procs.sweep_leftovers(data_dir) == []
        assert planted.poll() is None
    finally:
        planted.kill()
        planted.wait()
