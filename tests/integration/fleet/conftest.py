from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from bot.store import keys
from tests.fakes.redis_server import RedisServer


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    """A client of the session's redis-server, with no replica listed yet."""
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await connection.delete(keys.FLEET_REPLICAS)
    yield connection
    await connection.aclose()
