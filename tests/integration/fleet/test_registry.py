"""Replica heartbeats against a real redis-server: who is alive, with how much room."""

from __future__ import annotations

import time
import uuid

import redis.asyncio as redis
from structlog.testing import capture_logs

from bot.fleet.placement import Room
from bot.fleet.registry import Beat, Registry
from bot.store import keys
from tests.support.helpers import wait_for


def beat(name: str, sessions: int = 1) -> Beat:
    return Beat(Room(name, sessions, 10, 100, 1000), f"http://{name}:8080", time.time(), "digest")


async def test_live_replicas_are_listed_with_their_room(client: redis.Redis) -> None:
    registry = Registry(client, ttl_s=30)
    await registry.beat(beat("b", sessions=3))
    await registry.beat(beat("a"))
    live = await registry.live()
    assert [b.replica for b in live] == ["a", "b"]
    assert live[1].room == Room("b", 3, 10, 100, 1000)
    assert live[1].address == "http://b:8080"


async def test_a_replica_that_stops_beating_drops_out(client: redis.Redis) -> None:
    short, long = Registry(client, ttl_s=0.2), Registry(client, ttl_s=30)
    await short.beat(beat("gone-" + uuid.uuid4().hex[:6]))
    await long.beat(beat("stays"))

    async def only_one_left() -> bool:
        return [b.replica for b in await long.live()] == ["stays"]

    await wait_for(only_one_left, timeout=10, what="the silent replica to drop out")


async def test_a_drained_replica_leaves_at_once(client: redis.Redis) -> None:
    registry = Registry(client, ttl_s=30)
    await registry.beat(beat("a"))
    await registry.beat(beat("b"))
    await registry.leave("a")
    assert [b.replica for b in await registry.live()] == ["b"]


async def test_an_unreadable_heartbeat_is_skipped_and_the_rest_still_listed(client: redis.Redis) -> None:
    registry = Registry(client, ttl_s=30)
    await registry.beat(beat("good"))
    for name, raw in [("not-json", "{nope"), ("wrong-shape", '{"room": 3}'), ("empty", "{}")]:
        await client.set(keys.fleet_replica(name), raw)
        await client.zadd(keys.FLEET_REPLICAS, {name: int(time.time() * 1000)})
    with capture_logs() as logs:
        assert [b.replica for b in await registry.live()] == ["good"]
    assert sorted(e["replica"] for e in logs if e["event"] == "fleet_heartbeat_unreadable") == [
        "empty",
        "not-json",
        "wrong-shape",
    ]
