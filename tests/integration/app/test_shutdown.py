"""The shutdown budget: every step shares one deadline, and the deployment manifests leave room for it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from bot.app import shutdown, wiring
from bot.config import HttpConfig
from tests.fakes.model import FakeModel
from tests.support import paths
from tests.support.helpers import gone, wait_until
from tests.support.inproc import InProcessDaemon

DEPLOY = paths.ROOT / "deploy"
# What a pod or container gets on top of the daemon's own budget: signal delivery and process exit.
RUNTIME_SLACK_S = 5


class HangingChannel:
    """A channel whose intake stop and close never return (until cancelled)."""

    name = "hanging"

    async def start(self) -> None:
        pass

    async def stop_intake(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        await asyncio.Event().wait()


def cli_processes(under: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.name() == "claude" and Path(proc.cwd()).is_relative_to(under):
                found.append(proc)
    return found


async def ask(url: str, text: str) -> None:
    """A message whose answer does not matter: the daemon under test stops while it runs."""
    with contextlib.suppress(aiohttp.ClientError):
        async with aiohttp.ClientSession() as http:
            await http.post(f"{url}/v1/conversations/slow/messages", json={"text": text})


async def test_stuck_services_share_one_deadline_and_the_cli_dies(
    tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown, "SHUTDOWN_MARGIN_S", 2.0)
    monkeypatch.setattr(wiring, "build_channels", lambda *_: [HangingChannel()])
    fake_model.add("slow", text="never sent", delay_s=30)
    channels: dict[str, Any] = {}
    running = InProcessDaemon(tmp_path, fake_model, channels, http={"drain_grace_s": 1.0})
    budget_s = shutdown.shutdown_budget_s(running.settings.http)
    await running.start()
    in_flight = asyncio.create_task(ask(running.url, "slow"))
    await wait_until(lambda: bool(fake_model.find("slow")), what="the slow turn to reach the model")
    cli = cli_processes(tmp_path)
    assert cli
    stopping_at = time.monotonic()
    await running.stop(timeout=budget_s + 2)
    assert time.monotonic() - stopping_at < budget_s
    await wait_until(lambda: all(gone(p) for p in cli), 5, "the CLI process tree to die")
    await in_flight


def test_manifests_leave_room_for_the_shutdown_budget() -> None:
    expected = shutdown.shutdown_budget_s(HttpConfig()) + RUNTIME_SLACK_S
    manifest = (DEPLOY / "k8s" / "statefulset.yaml").read_text()
    kubernetes = re.search(r"^\s*terminationGracePeriodSeconds:\s*(\d+)", manifest, re.M)
    compose = re.search(r"^\s*stop_grace_period:\s*(\d+)s\s", (DEPLOY / "compose.yaml").read_text(), re.M)
    assert kubernetes and compose
    assert int(kubernetes[1]) == int(compose[1]) == expected
