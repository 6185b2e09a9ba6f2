"""Idempotency-Key: one turn per key, retries get the recorded outcome, and a crash loses nothing.

Against the real pool and CLI (fake Messages API), the real durable intake (SQLite), and for the crash a
real ``agentd run`` killed with SIGKILL mid-turn and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.config import HttpConfig
from bot.http import Api
from bot.receipts import Receipts
from bot.store.intake import SqliteIntake
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_for, wait_until

TOKEN = "test-api-token-idem"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(make_pool: PoolFactory, tmp_path: Path) -> AsyncIterator[str]:
    pool = await make_pool()
    intake = SqliteIntake(tmp_path / "intake.db")
    receipts = Receipts(intake, pool)
    server = Api(HttpConfig(listen="127.0.0.1:0", api_token=TOKEN), pool, pool.store, receipts=receipts)
    await server.start()
    yield f"http://127.0.0.1:{server.port}"
    await server.stop()
    await receipts.close()
    await intake.close()


async def post(http: aiohttp.ClientSession, url: str, text: str, key: str | None, **headers: str) -> tuple[int, dict]:
    sent = {**headers, **({"Idempotency-Key": key} if key is not None else {})}
    async with http.post(url, json={"text": text}, headers=sent) as response:
        return response.status, await response.json()


async def sse_events(http: aiohttp.ClientSession, url: str, text: str, key: str) -> list[tuple[str, dict]]:
    headers = {"Idempotency-Key": key, "Accept": "text/event-stream"}
    events: list[tuple[str, dict]] = []
    async with http.post(url, json={"text": text}, headers=headers) as response:
        event = ""
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
    return events


async def test_a_retry_with_the_same_key_gets_the_recorded_outcome_and_runs_no_second_turn(
    api: str, fake_model: FakeModel
) -> None:
    url, key = f"{api}/v1/conversations/idem1/messages", str(uuid.uuid4())
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        first = await post(http, url, "count me once", key)
        again = await post(http, url, "count me once", key)
        async with http.get(f"{url}/{key}") as response:
            looked_up = response.status, await response.json()
    assert first == (200, again[1]) and first[1]["reply"] == "echo: count me once"
    assert again[0] == 200
    assert len(fake_model.find("count me once")) == 1, "the retry ran no second turn"
    assert looked_up == (200, {"status": "done", **first[1]})


async def test_concurrent_sends_of_one_key_share_one_turn_streamed_or_not(api: str, fake_model: FakeModel) -> None:
    fake_model.add("slow and single", text="one answer for all", delay_s=0.5)
    url, key = f"{api}/v1/conversations/idem2/messages", str(uuid.uuid4())
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        streamed, (status, plain), (_, other) = await asyncio.gather(
            sse_events(http, url, "slow and single", key),
            post(http, url, "slow and single", key),
            post(http, url, "slow and single", key),
        )
    assert status == 200 and plain["reply"] == other["reply"] == "one answer for all"
    assert streamed[-1] == ("result", plain)
    assert len(fake_model.find("slow and single")) == 1


async def test_while_the_turn_runs_the_lookup_says_running_then_done(api: str, fake_model: FakeModel) -> None:
    fake_model.add("take your time", text="finally", delay_s=1.0)
    url, key = f"{api}/v1/conversations/idem3/messages", "key-3"
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        sending = asyncio.create_task(post(http, url, "take your time", key))
        await wait_until(lambda: bool(fake_model.find("take your time")), what="the turn to reach the model")
        async with http.get(f"{url}/{key}") as response:
            assert (response.status, await response.json()) == (202, {"status": "running"})
        status, body = await sending
        assert status == 200
        async with http.get(f"{url}/{key}") as response:
            assert response.status == 200 and (await response.json())["reply"] == body["reply"] == "finally"


async def test_bad_keys_and_a_reused_key_are_refused_clearly_and_the_api_serves_on(api: str) -> None:
    url = f"{api}/v1/conversations/idem4/messages"
    async with aiohttp.ClientSession(headers=HEADERS) as http:
        for bad in ("", "x" * 256, "with space", "tab\there"):
            status, body = await post(http, url, "hello", bad)
            assert status == 400 and "Idempotency-Key" in body["error"], bad
        assert (await post(http, url, "the first text", "reused"))[0] == 200
        status, body = await post(http, url, "another text", "reused")
        assert status == 422 and "another message" in body["error"]
        async with http.get(f"{url}/never-sent") as response:
            assert response.status == 404
        assert (await post(http, url, "still serving", None))[0] == 200


async def test_a_message_refused_before_it_ran_keeps_nothing_and_its_retry_runs(
    make_pool: PoolFactory, tmp_path: Path, fake_model: FakeModel
) -> None:
    pool = await make_pool(pool={"busy_policy": "reject"})
    intake = SqliteIntake(tmp_path / "intake.db")
    receipts = Receipts(intake, pool)
    server = Api(HttpConfig(listen="127.0.0.1:0", api_token=TOKEN), pool, pool.store, receipts=receipts)
    await server.start()
    fake_model.add("hold the line", text="held", delay_s=1.0)
    url = f"http://127.0.0.1:{server.port}/v1/conversations/idem5/messages"
    try:
        async with aiohttp.ClientSession(headers=HEADERS) as http:
            holding = asyncio.create_task(post(http, url, "hold the line", None))
            await wait_until(lambda: bool(fake_model.find("hold the line")), what="the first turn to run")
            status, body = await post(http, url, "after the hold", "k5")
            assert status == 409 and body["failure"] == "busy"
            await holding
            status, body = await post(http, url, "after the hold", "k5")
            assert status == 200 and body["reply"] == "echo: after the hold"
    finally:
        await server.stop()
        await receipts.close()
        await intake.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_a_message_accepted_by_a_daemon_killed_mid_turn_is_answered_after_the_restart(
    tmp_path: Path, fake_model: FakeModel, request: pytest.FixtureRequest, store: str
) -> None:
    """The loss window is closed: accepted, SIGKILL mid-turn, started again, run once more, answered once."""
    stuck = fake_model.add("survive the crash", text="answered after all", delay_s=120, once=True)
    env = {"REDIS_URL": request.getfixturevalue("redis_server").url} if store == "redis" else {}
    # The restarted daemon finds its intake stream by its replica name (a StatefulSet pod keeps its own).
    replica = f'[cluster]\nreplica = "crash-{uuid.uuid4().hex[:8]}"\nlease_ttl_s = 2\n'
    daemon = DaemonProcess(tmp_path, fake_model.url, extra_env=env, toml=replica)
    await daemon.start()
    url, key = f"{daemon.url}/v1/conversations/crash/messages", str(uuid.uuid4())
    async with aiohttp.ClientSession(headers=daemon.headers) as http:
        sending = asyncio.create_task(post(http, url, "survive the crash", key))
        await wait_until(lambda: stuck.used, what="the turn to reach the model")
        await asyncio.to_thread(daemon.kill)
        with contextlib.suppress(aiohttp.ClientError):
            await sending  # the connection broke with the daemon
        fake_model.add("survive the crash", text="answered after all")
        await daemon.start()
        status, body = await post(http, url, "survive the crash", key)
        assert status == 200 and body["reply"] == "answered after all"

        async def recorded() -> bool:
            async with http.get(f"{url}/{key}") as response:
                return response.status == 200

        await wait_for(recorded, what="the outcome to be recorded")
        assert (await post(http, url, "survive the crash", key))[1] == body, "one outcome, however often asked"
    assert len(fake_model.find("survive the crash")) == 2, "run once before the crash and once after, no more"
    await daemon.stop()
