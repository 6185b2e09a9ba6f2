"""A daemon's CLI processes and their helpers never outlive it: they die with it, and a restart sweeps the rest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.daemon_proc import DaemonProcess
from tests.fakes.model import FakeModel
from tests.helpers import gone, wait_until

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
