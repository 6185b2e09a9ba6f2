"""Spares: CLI processes started ahead of demand, per profile, so a new conversation adopts one instead of a spawn."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bot.core import ConversationRecord, Profile
from bot.pool.room import Room
from bot.pool.worker import Worker, WorkerHost, WorkerState

# A spare still starting may be adopted: its conversation waits for it rather than for a new CLI.
_ADOPTABLE = (WorkerState.STARTING, WorkerState.WARM)


class SparesHost(WorkerHost, Protocol):
    """What the spares need of their pool beyond what a worker does: its room and its profiles."""

    room: Room

    def profile(self, name: str) -> Profile: ...


@dataclass
class SpareBackoff:
    """Capped doubling delay between spare spawns after failures, so a broken CLI is not spawned in a loop."""

    first_s: float = 0.5
    max_s: float = 30.0
    failures: int = 0
    not_before: float = 0.0

    def failed(self) -> None:
        self.failures += 1
        self.not_before = time.monotonic() + min(self.first_s * 2 ** (self.failures - 1), self.max_s)

    def succeeded(self) -> None:
        self.failures, self.not_before = 0, 0.0

    def wait_s(self) -> float:
        return max(self.not_before - time.monotonic(), 0.0)


class Spares:
    """The spares of one pool, in start order: filled up to each profile's ``prewarm``, taken by new conversations."""

    def __init__(self, host: SparesHost) -> None:
        self._host = host
        self.workers: list[Worker] = []
        self.backoff = SpareBackoff()
        self.timer: asyncio.Task[None] | None = None

    def fill(self) -> None:
        wait_s = self.backoff.wait_s()
        if wait_s > 0:
            if self.timer is None or self.timer.done():
                self.timer = asyncio.create_task(self._fill_after(wait_s), name="pool:spares")
            return
        host = self._host
        for profile_name, wanted in host.settings.pool.prewarm_by_profile.items():
            profile = host.profile(profile_name)
            while not host.stopping and self._count(profile) < wanted and host.room.spare_fits():
                name = f"spare-{uuid.uuid4().hex[:12]}"
                record = new_record(host.data_dir, f"spare:{name}", name, profile.name)
                self.workers.append(Worker(host, record, resume=False, spare=True, profile=profile))

    def take(self, profile: Profile) -> Worker | None:
        if self._host.room.conversations() >= self._host.settings.pool.max_sessions:
            return None
        for spare in self.workers:
            # Spares are per profile: tools and MCP servers are fixed when a process starts.
            if spare.profile == profile and spare.retire_reason is None and spare.state in _ADOPTABLE:
                self.workers.remove(spare)
                return spare
        return None

    def exited(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.spare and worker.admitted and not worker.connected:
            self.backoff.failed()

    def _count(self, profile: Profile) -> int:
        return sum(1 for spare in self.workers if spare.profile == profile)

    async def _fill_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.fill()


def new_record(
    data_dir: Path, conversation_id: str, name: str, profile: str, session_id: str | None = None
) -> ConversationRecord:
    """A conversation's first record: its workdir and Claude state under ``data_dir``, named ``name``."""
    now = time.time()
    return ConversationRecord(
        conversation_id=conversation_id,
        workdir=str(data_dir / "work" / name),
        config_dir=str(data_dir / "state" / name / "claude"),
        session_id=session_id or str(uuid.uuid4()),
        profile=profile,
        state="starting",
        created_at=now,
        updated_at=now,
    )
