"""Each replica name is held by one running daemon: two daemons under one ``cluster.replica`` would
share one durable intake stream, and each would run again what the other is running.

The hold is a lease named ``replica:<name>`` whose holder is this process (the name plus a random
instance id), renewed for the daemon's life through a ``LeasedDuty``. A daemon SIGKILLed a moment ago
still holds its name until the lease lapses, so a new one waits up to the lease's TTL (and a little
more) before it refuses to start: a daemon still renewing it is alive.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from bot.fleet.duty import LeasedDuty
from bot.fleet.lease import Lease, Leases

log = structlog.get_logger(__name__)


class ReplicaNameTaken(Exception):
    """Another running daemon holds this replica name."""


class ReplicaName:
    def __init__(self, client: redis.Redis, replica: str, ttl_s: float) -> None:
        self.replica, self._ttl_s = replica, ttl_s
        self._leases = Leases(client, f"{replica}#{uuid.uuid4().hex[:12]}", ttl_s)
        self._duty = LeasedDuty(self._leases, f"replica:{replica}", ttl_s)
        self._released = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def take(self) -> None:
        """Hold the name, waiting out a dead predecessor's lease; ``ReplicaNameTaken`` if a live daemon holds it."""
        try:
            await self._wait_until_free()
        except RedisError as exc:  # checked again by the hold itself once Redis answers
            log.warning("replica_name_unchecked", replica=self.replica, error=str(exc)[:200])
        self._task = asyncio.create_task(self._duty.run(self._held), name=f"replica name {self.replica}")

    async def release(self) -> None:
        self._duty.stop()
        self._released.set()
        if self._task is not None:
            await self._task

    async def _wait_until_free(self) -> None:
        give_up_at = time.monotonic() + self._ttl_s * 1.5
        while True:
            got = await self._leases.acquire(self._duty.name)
            if isinstance(got, Lease):
                return
            if time.monotonic() > give_up_at:
                raise ReplicaNameTaken(
                    f"cluster.replica {self.replica!r} is in use by another running agentd ({got.holder}): "
                    "give each replica its own name (the default is the hostname)"
                )
            log.info("replica_name_waiting", replica=self.replica, holder=got.holder)
            await asyncio.sleep(self._ttl_s / 6)

    async def _held(self) -> None:
        await self._released.wait()
