"""Duties (``bot.core.Duty``): work one replica at a time may do, such as the IMAP intake.

Alone (the embedded store), the daemon always holds its duties: ``SoleDuty``. With replicas on one
Redis, ``LeasedDuty`` holds a lease (``bot.fleet.lease``): the holder renews it every third of its TTL
and does the work; the others try to take it at the same pace, so a dead holder's duty moves within
one TTL. A holder that cannot renew in time (Redis unreachable, or its lease taken after a pause)
stops the work at once, and its fenced writes (the IMAP checkpoint) are refused from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from redis.exceptions import RedisError

from bot import metrics
from bot.core import DutyLost, Store
from bot.fleet.lease import Fenced, Lease, Leases

log = structlog.get_logger(__name__)


class SoleDuty:
    """The only daemon: the duty is always held, and its writes are plain store writes."""

    held = True

    def __init__(self, store: Store) -> None:
        self._store = store

    async def run(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await work()

    def stop(self) -> None:
        """The work stops itself (the IMAP watcher has its own stop)."""

    async def put_value(self, name: str, value: str, ttl_s: int) -> None:
        await self._store.put_value(name, value, ttl_s)


class LeasedDuty:
    """Held by one replica at a time through a lease named ``duty:<name>``."""

    def __init__(self, leases: Leases, name: str, ttl_s: float) -> None:
        self._leases, self.name, self._ttl_s = leases, f"duty:{name}", ttl_s
        self._every_s = ttl_s / 3
        self._lease: Lease | None = None
        self._stopping = asyncio.Event()

    @property
    def held(self) -> bool:
        return self._lease is not None

    def stop(self) -> None:
        """No new attempt to take the duty; work already running is stopped by its owner (then released)."""
        self._stopping.set()

    async def run(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while not self._stopping.is_set():
            lease = await self._take()
            if lease is None:
                return
            if await self._serve(lease, work):
                return

    async def put_value(self, name: str, value: str, ttl_s: int) -> None:
        lease = self._lease
        if lease is None:
            raise DutyLost(f"{self.name} is not held by this replica")
        try:
            await self._leases.fenced_set(lease, name, value, ttl_s)
        except Fenced as exc:
            raise DutyLost(str(exc)) from exc

    async def _take(self) -> Lease | None:
        """The lease once this replica gets it; None if stopped first. A holder elsewhere is waited out."""
        waiting_on = ""
        while not self._stopping.is_set():
            try:
                got = await self._leases.acquire(self.name)
            except RedisError as exc:
                log.warning("duty_unreachable", duty=self.name, error=str(exc)[:200])
            else:
                if isinstance(got, Lease):
                    log.info("duty_taken", duty=self.name, epoch=got.epoch)
                    return got
                if got.holder != waiting_on:
                    waiting_on = got.holder
                    log.info("duty_held_elsewhere", duty=self.name, holder=got.holder)
            await self._pause(self._every_s)
        return None

    async def _serve(self, lease: Lease, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Do the work while the lease holds; True when the work ended, False when the lease was lost."""
        self._lease = lease
        metrics.DUTY_HELD.labels(duty=self.name).set(1)
        task = asyncio.create_task(work(), name=self.name)
        ended: bool | None = None  # None: cancelled itself (the shutdown deadline), which is no loss
        try:
            ended = await self._renew_until(lease, task)
        finally:
            self._lease = None
            metrics.DUTY_HELD.labels(duty=self.name).set(0)
            if ended is False:
                metrics.DUTY_LOSSES.labels(duty=self.name).inc()
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the work's own errors surface here: it catches what it can at its boundary
            await self._release(lease)
        return bool(ended)

    async def _renew_until(self, lease: Lease, task: asyncio.Task[None]) -> bool:
        """Renew until the work ends (its owner stops it) or the lease is lost (False)."""
        # Past two thirds of the TTL unrenewed, the lease may expire and be taken: stop before another
        # replica can begin, whether Redis refuses, fails or hangs (a renewal waits no longer than that).
        safe_until = time.monotonic() + self._ttl_s * 2 / 3
        while True:
            done, _ = await asyncio.wait({task}, timeout=self._every_s)
            if done:
                return True
            asked_at = time.monotonic()
            try:
                async with asyncio.timeout(max(0.0, safe_until - asked_at)):
                    renewed = await self._leases.renew(lease)
            except (RedisError, TimeoutError) as exc:
                log.warning("duty_unreachable", duty=self.name, error=str(exc)[:200] or type(exc).__name__)
                if time.monotonic() >= safe_until:
                    log.warning("duty_lost", duty=self.name, epoch=lease.epoch)
                    return False
                continue
            if not renewed:
                log.warning("duty_taken_elsewhere", duty=self.name, epoch=lease.epoch)
                return False
            safe_until = asked_at + self._ttl_s * 2 / 3

    async def _release(self, lease: Lease) -> None:
        with contextlib.suppress(RedisError):  # unreachable: it expires within its TTL anyway
            await self._leases.release(lease)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
