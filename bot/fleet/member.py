"""A replica's place in the fleet: its heartbeat, beaten until it leaves.

One long-lived task writes the heartbeat every ``interval_s``; a failed write is logged and tried
again at the next beat (a replica whose heartbeat expires simply drops out of placement). Leaving
(a drained replica) removes the heartbeat at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from pydantic import BaseModel, SecretStr
from redis.exceptions import RedisError

from bot.config import Settings
from bot.fleet.placement import Room
from bot.fleet.registry import Beat, Registry

log = structlog.get_logger()

# What every replica must share: the same profiles, jobs and budgets, or a conversation would be
# served differently depending on where it runs. Pool sizes, ports and data dirs may differ.
SHARED_SECTIONS = ("agent", "profiles", "schedule", "budget", "gateway", "triage", "slack", "email")


def settings_digest(settings: Settings) -> str:
    """A digest of the settings the fleet must agree on; secrets are left out, not hashed."""
    shared = {section: _without_secrets(getattr(settings, section)) for section in SHARED_SECTIONS}
    canonical = json.dumps(shared, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _without_secrets(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return {name: _without_secrets(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, SecretStr):
        return "<secret>"
    if isinstance(value, dict):
        return {str(k): _without_secrets(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_secrets(v) for v in value]
    return value


class Member:
    """Beats this replica's heartbeat: its room (from ``room``), its address and its settings digest."""

    def __init__(
        self, registry: Registry, address: str, digest: str, room: Callable[[], Room], interval_s: float
    ) -> None:
        self._registry = registry
        self._address = address
        self._digest = digest
        self._room = room
        self._interval_s = interval_s

    async def beat_once(self) -> None:
        await self._registry.beat(Beat(self._room(), self._address, time.time(), self._digest))

    async def beat_forever(self) -> None:
        while True:
            try:
                await self.beat_once()
            except (RedisError, OSError) as exc:  # the next beat tries again; expiry handles a long outage
                log.warning("fleet_heartbeat_failed", error=str(exc)[:200])
            await asyncio.sleep(self._interval_s)

    @contextlib.asynccontextmanager
    async def joined(self) -> AsyncIterator[Member]:
        """In the fleet while inside: the heartbeat runs; on the way out it stops and the replica leaves."""
        await self.beat_once()  # listed before the first message can be forwarded here
        task = asyncio.create_task(self.beat_forever(), name="fleet-heartbeat")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await self._registry.leave(self._room().replica)
            except (RedisError, OSError) as exc:  # its heartbeat expires instead
                log.warning("fleet_leave_failed", error=str(exc)[:200])
