"""A job occurrence whose daemon is SIGKILLed mid-run runs again when the daemon starts, once."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.core import IntakeEntry
from bot.store.intake import SqliteIntake
from tests.fakes.model import FakeModel
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_for, wait_until

SCHEDULE = '[[schedule]]\nid = "durable"\nevery = 2\nprompt = "run durable"\nprofile = "chat"\n'


async def runs(daemon: DaemonProcess) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=daemon.headers) as http,
        http.get(f"{daemon.url}/v1/jobs/durable/runs") as response,
    ):
        return list((await response.json())["runs"])


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_an_occurrence_killed_mid_run_runs_again_at_the_next_start(
    tmp_path: Path, fake_model: FakeModel, store: str, request: pytest.FixtureRequest
) -> None:
    fake_model.add("run durable", text="never answered", delay_s=60, once=True)
    env = {"REDIS_URL": request.getfixturevalue("redis_server").url} if store == "redis" else {}
    toml = f'[cluster]\nreplica = "r-{uuid.uuid4().hex[:8]}"\nlease_ttl_s = 2\n{SCHEDULE}'
    first = DaemonProcess(tmp_path, fake_model.url, env, toml=toml)
    await first.start()
    await wait_until(lambda: bool(fake_model.find("run durable")), 30, "the first occurrence's turn to start")
    first.kill()
    restarted_at = time.time()
    second = DaemonProcess(tmp_path, fake_model.url, env, toml=toml)
    await second.start()
    try:
        before: list[dict[str, Any]] = []

        async def replayed() -> bool:
            before[:] = [
                r for r in await runs(second) if datetime.fromisoformat(r["fire_time"]).timestamp() < restarted_at
            ]
            return any(r["status"] == "ok" for r in before)

        await wait_for(replayed, 60, "the interrupted occurrence to run again")
    finally:
        assert await second.stop() == 0
    done = [r["fire_time"] for r in before if r["status"] == "ok"]
    assert len(done) == 1, f"only the interrupted occurrence ran again, once: {before}"
    assert all(r["status"] == "skipped" for r in before if r["fire_time"] not in done), before
    assert "job_replayed" in second.log.read_text()


async def test_unreadable_and_unknown_accepted_occurrences_are_settled_and_the_daemon_serves(
    tmp_path: Path, fake_model: FakeModel
) -> None:
    daemon = DaemonProcess(tmp_path, fake_model.url, toml=SCHEDULE)
    daemon.data_dir.mkdir(parents=True)
    intake = SqliteIntake(daemon.data_dir / "agentd.db")
    entries = {
        "job:durable:garbled": "{not json",
        "job:durable:no-time": '{"job": "durable"}',
        "job:gone:2026-12-01T08:00:00+00:00": '{"job": "gone", "fire_time": "2026-12-01T08:00:00+00:00"}',
        "job:durable:2026-12-01T08:00:00+00:00": '{"job": "durable", "fire_time": "2026-12-01T08:00:00+00:00"}',
    }
    for key, payload in entries.items():
        assert await intake.accept(IntakeEntry(key, "job:durable", payload, time.time()))
    await intake.close()
    await daemon.start()
    try:
        reopened = SqliteIntake(daemon.data_dir / "agentd.db")

        async def settled() -> bool:
            return all([await reopened.outcome(key) is not None for key in entries])

        try:
            await wait_for(settled, 30, "every accepted occurrence to get an outcome")
        finally:
            await reopened.close()
        late = [r for r in await runs(daemon) if r["fire_time"] == "2026-12-01T08:00:00+00:00"]
        assert [r["status"] for r in late] == ["cancelled"], "too late to run again, and the history says so"
        assert (await daemon.ask("after", "still serving?"))["reply"] == "echo: still serving?"
    finally:
        assert await daemon.stop() == 0
    log = daemon.log.read_text()
    assert log.count("job_not_replayed") == 4 and "Traceback" not in log
