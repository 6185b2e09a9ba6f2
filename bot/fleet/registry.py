"""Which replicas are alive, and how much room each has: heartbeats in Redis.

Each replica writes its heartbeat every few seconds: its room (for placement), the address other
replicas forward to, its clock and a digest of the settings that must agree across the fleet. A
heartbeat expires after ``ttl_s``; a replica that stops beating drops out of ``live()`` by then.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import redis.asyncio as redis
import structlog

from bot.fleet.placement import Room
from bot.store import keys

log = structlog.get_logger()


@dataclass(frozen=True)
class Beat:
    """One replica's heartbeat."""

    room: Room
    address: str  # where the others forward its conversations' messages
    clock: float  # its wall clock when it beat (epoch s): replicas whose clocks disagree show up
    settings: str  # a digest of the settings every replica must share

    @property
    def replica(self) -> str:
        return self.room.replica

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> Beat:
        data = json.loads(raw)
        return cls(Room(**data["room"]), str(data["address"]), float(data["clock"]), str(data["settings"]))


class Registry:
    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._redis = client
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def beat(self, beat: Beat) -> None:
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.fleet_replica(beat.replica), beat.to_json(), px=self._ttl_ms)
            pipe.zadd(keys.FLEET_REPLICAS, {beat.replica: now_ms})
            await pipe.execute()

    async def live(self) -> list[Beat]:
        """Every replica whose heartbeat has not expired, by name; forgets the ones that have."""
        now_ms = int(time.time() * 1000)
        await self._redis.zremrangebyscore(keys.FLEET_REPLICAS, "-inf", now_ms - 2 * self._ttl_ms)
        names = [_text(n) for n in await self._redis.zrange(keys.FLEET_REPLICAS, 0, -1)]
        if not names:
            return []
        raws = await self._redis.mget([keys.fleet_replica(name) for name in names])
        beats = [beat for name, raw in zip(names, raws, strict=True) if (beat := _read(name, raw)) is not None]
        return sorted(beats, key=lambda beat: beat.replica)

    async def leave(self, replica: str) -> None:
        """A replica that stops (drained) leaves at once instead of expiring."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.fleet_replica(replica))
            pipe.zrem(keys.FLEET_REPLICAS, replica)
            await pipe.execute()


def _read(name: str, raw: object) -> Beat | None:
    """A heartbeat, or None if it expired meanwhile or cannot be read (a replica of another version)."""
    if raw is None:
        return None
    try:
        return Beat.from_json(_text(raw))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("fleet_heartbeat_unreadable", replica=name[:200], error=str(exc)[:200])
        return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
