"""A replica's heartbeat against a real redis-server: listed while joined, gone when it leaves."""

from __future__ import annotations

import uuid

import redis.asyncio as redis
from pydantic import SecretStr

from bot.config import AgentConfig, PoolConfig, Settings
from bot.fleet.member import Member, settings_digest
from bot.fleet.placement import Room
from bot.fleet.registry import Registry
from tests.support.helpers import wait_for


async def test_a_joined_replica_is_listed_with_its_current_room_and_leaves_on_exit(client: redis.Redis) -> None:
    registry = Registry(client, ttl_s=30)
    name = f"r-{uuid.uuid4().hex[:6]}"
    sessions = [0]
    member = Member(registry, "http://r:8080", "d1", lambda: Room(name, sessions[0], 10), interval_s=0.05)
    async with member.joined():
        assert [b.replica for b in await registry.live()] == [name]
        sessions[0] = 7

        async def seven() -> bool:
            return [b.room.sessions for b in await registry.live()] == [7]

        await wait_for(seven, timeout=10, what="the next heartbeat to carry the new room")
    assert await registry.live() == []


def test_the_digest_follows_shared_settings_not_local_ones_nor_secrets() -> None:
    base = Settings()
    assert settings_digest(base) == settings_digest(Settings(pool=PoolConfig(max_sessions=3)))
    assert settings_digest(base) != settings_digest(Settings(agent=AgentConfig(model="claude-other")))
    with_key = Settings(agent=AgentConfig(api_key=SecretStr("sk-ant-one")))
    other_key = Settings(agent=AgentConfig(api_key=SecretStr("sk-ant-two")))
    assert settings_digest(with_key) == settings_digest(other_key), "secrets are left out, not hashed"
