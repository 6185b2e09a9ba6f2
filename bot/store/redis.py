"""The Redis implementation of the Store protocol (redis-py asyncio client)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping, Sequence
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.core import ConversationRecord, StoreError
from bot.store import keys

T = TypeVar("T")

# Errors that mean the socket (or the server behind it) is gone.  Only these
# justify dropping the pooled connections; a WRONGTYPE or script error does not.
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def connect(url: str) -> redis.Redis:
    """A client that retries a dropped connection a few times, with bounded waits (the store's and the intake's)."""
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=4),
        retry_on_error=[ConnectionError, TimeoutError, OSError],
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        health_check_interval=15,
        decode_responses=True,
    )


class RedisStore:
    """Records as JSON strings under ``keys.conversation(id)``, indexed by a set.

    The client reconnects by itself: a command issued while Redis restarts is
    retried with backoff, then fails with StoreError.
    """

    def __init__(self, url: str, ttl_days: int) -> None:
        self._ttl_s = keys.conversation_ttl_s(ttl_days)
        self._redis = connect(url)

    async def get(self, conversation_id: str) -> ConversationRecord | None:
        raw = await self._call(self._redis.get(keys.conversation(conversation_id)))
        return ConversationRecord.from_json(raw) if raw else None

    async def put(self, record: ConversationRecord) -> None:
        key = keys.conversation(record.conversation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(key, record.to_json(), ex=self._ttl_s)
            pipe.sadd(keys.CONVERSATION_INDEX, record.conversation_id)
            await self._call(pipe.execute())

    async def delete(self, conversation_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.conversation(conversation_id))
            pipe.srem(keys.CONVERSATION_INDEX, conversation_id)
            await self._call(pipe.execute())

    async def records(self) -> list[ConversationRecord]:
        members = await self._call(self._redis.smembers(keys.CONVERSATION_INDEX))
        ids = sorted(str(m) for m in members)
        if not ids:
            return []
        raws = await self._call(self._redis.mget([keys.conversation(i) for i in ids]))
        expired = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if expired:
            await self._call(self._redis.srem(keys.CONVERSATION_INDEX, *expired))
        return [ConversationRecord.from_json(raw) for raw in raws if raw]

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()

    async def claim(self, name: str, ttl_s: int) -> bool:
        return bool(await self._call(self._redis.set(name, "1", ex=ttl_s, nx=True)))

    async def get_value(self, name: str) -> str | None:
        raw = await self._call(self._redis.get(name))
        return None if raw is None else str(raw)

    async def put_value(self, name: str, value: str, ttl_s: int) -> None:
        await self._call(self._redis.set(name, value, ex=ttl_s))

    async def delete_value(self, name: str) -> None:
        await self._call(self._redis.delete(name))

    async def incr(self, name: str, window_s: int) -> int:
        # SET NX EX opens the window (INCR keeps its TTL); EXPIRE NX would need Redis 7.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(name, 0, ex=window_s, nx=True)
            pipe.incr(name)
            _, count = await self._call(pipe.execute())
        return int(count)

    async def add_floats(self, amounts: Mapping[str, float], ttl_s: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, amount in amounts.items():
                pipe.set(name, 0, ex=ttl_s, nx=True)
                pipe.incrbyfloat(name, amount)
            await self._call(pipe.execute())

    async def get_values(self, names: Sequence[str]) -> dict[str, str]:
        if not names:
            return {}
        found = await self._call(self._redis.mget(list(names)))
        return {name: str(value) for name, value in zip(names, found, strict=True) if value is not None}

    async def values(self, prefix: str) -> dict[str, str]:
        names = await self._call(self._scan(re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"))
        if not names:
            return {}
        found = await self._call(self._redis.mget(names))
        return {name: str(value) for name, value in zip(names, found, strict=True) if value is not None}

    async def _scan(self, pattern: str) -> list[str]:
        return [str(name) async for name in self._redis.scan_iter(match=pattern, count=500)]

    async def _call(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except _CONNECTION_ERRORS as exc:
            # Close every pooled socket: after a server restart they are all dead,
            # and the next command should start from fresh connections.
            await self._redis.connection_pool.disconnect()
            raise StoreError(f"redis: {exc}") from exc
        except RedisError as exc:  # a command error: the connections are healthy
            raise StoreError(f"redis: {exc}") from exc
