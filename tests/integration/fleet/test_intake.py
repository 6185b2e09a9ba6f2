"""Durable intake, both implementations (real SQLite file, real redis-server): accept, record, replay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from bot.core import Intake, IntakeEntry
from bot.store.intake import RedisIntake, SqliteIntake
from tests.fakes.redis_server import RedisServer


@pytest.fixture(params=["sqlite", "redis"])
async def opened(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Intake, object]]:
    """An intake, and how to open it again (a restart of the same replica)."""
    if request.param == "sqlite":
        path = tmp_path / "agentd.db"
        first = SqliteIntake(path)
        yield first, lambda: SqliteIntake(path)
        await first.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url, decode_responses=True)
    replica = f"replica-{uuid.uuid4().hex[:8]}"
    yield RedisIntake(client, replica), lambda: RedisIntake(client, replica)
    await client.aclose()


def entry(key: str, conversation: str = "api:c", payload: str = '{"text": "hi"}') -> IntakeEntry:
    return IntakeEntry(key, conversation, payload, time.time())


async def test_a_message_is_accepted_once_and_its_retry_is_told_so(opened: tuple[Intake, object]) -> None:
    intake, _ = opened
    key = f"api:idem:{uuid.uuid4().hex}"
    assert await intake.accept(entry(key))
    assert not await intake.accept(entry(key, payload='{"text": "a retry"}'))
    assert [e.key for e in await intake.unfinished()] == [key]
    assert (await intake.unfinished())[0].payload == '{"text": "hi"}', "the first acceptance is kept"


async def test_a_recorded_outcome_is_kept_and_the_message_no_longer_replayed(opened: tuple[Intake, object]) -> None:
    intake, _ = opened
    key = f"slack:event:{uuid.uuid4().hex}"
    await intake.accept(entry(key))
    await intake.record(key, '{"ok": true, "text": "done"}')
    recorded = await intake.outcome(key)
    assert recorded is not None and recorded.outcome == '{"ok": true, "text": "done"}'
    assert await intake.unfinished() == []
    assert not await intake.accept(entry(key)), "a retry after the outcome is still a retry"
    assert await intake.outcome("never-seen") is None


async def test_a_forgotten_message_is_gone_and_its_key_is_new_again(opened: tuple[Intake, object]) -> None:
    intake, _ = opened
    key = f"api:refused:{uuid.uuid4().hex}"
    assert not await intake.pending(key)
    await intake.accept(entry(key))
    assert await intake.pending(key)
    await intake.forget(key)
    assert not await intake.pending(key) and await intake.unfinished() == []
    assert await intake.accept(entry(key)), "a retry of a refused message is a new message"
    await intake.record(key, "{}")
    await intake.forget(key)
    assert not await intake.pending(key)
    assert await intake.outcome(key) is not None, "forget never drops a recorded outcome"
    assert not await intake.accept(entry(key)), "nor lets its key be accepted again"


async def test_after_a_crash_what_was_accepted_and_unfinished_is_there_in_order(
    opened: tuple[Intake, object],
) -> None:
    intake, reopen = opened
    keys = [f"mail:<{i}.{uuid.uuid4().hex}@example.org>" for i in range(5)]
    for key in keys:
        await intake.accept(entry(key))
    await intake.record(keys[1], '{"ok": true}')
    restarted: Intake = reopen()  # type: ignore[operator]
    assert [e.key for e in await restarted.unfinished()] == [keys[0], *keys[2:]]


async def test_concurrent_acceptances_of_one_key_admit_exactly_one(opened: tuple[Intake, object]) -> None:
    intake, _ = opened
    key = f"api:idem:{uuid.uuid4().hex}"
    results = await asyncio.gather(*(intake.accept(entry(key)) for _ in range(20)))
    assert results.count(True) == 1


async def test_hostile_keys_and_payloads_are_kept_verbatim(opened: tuple[Intake, object]) -> None:
    intake, _ = opened
    key = "api:idem:" + "}{ :*\n\u202e" * 200 + uuid.uuid4().hex
    payload = '{"text": "' + "\\u0000 ; DROP TABLE intake; --" * 100 + '"}'
    assert await intake.accept(entry(key, payload=payload))
    (kept,) = await intake.unfinished()
    assert (kept.key, kept.payload) == (key, payload)


async def test_a_surviving_replica_adopts_a_dead_ones_unfinished_messages(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        tag = uuid.uuid4().hex[:8]
        dead, alive = RedisIntake(client, f"dead-{tag}"), RedisIntake(client, f"alive-{tag}")
        keys = [f"slack:event:{tag}-{i}" for i in range(3)]
        for key in keys:
            assert await dead.accept(entry(key))
        await dead.record(keys[0], '{"ok": true}')
        adopted = await alive.adopt(f"dead-{tag}", min_idle_s=0)
        assert [e.key for e in adopted] == keys[1:]
        assert await alive.adopt(f"dead-{tag}", min_idle_s=0) == adopted, "still pending until recorded"
        for key in keys[1:]:
            await alive.record(key, '{"ok": true, "by": "the survivor"}')
        assert await alive.adopt(f"dead-{tag}", min_idle_s=0) == []
        assert await RedisIntake(client, f"dead-{tag}").unfinished() == [], "the dead replica's restart runs none"
        assert not await alive.accept(entry(keys[1])), "a retry of an adopted message is still a retry"
    finally:
        await client.aclose()
