"""Spares: CLI processes started ahead of demand, per profile, so a new conversation adopts one instead of a spawn."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from bot import procs
from bot.core import ConversationRecord, Profile
from bot.pool.room import Room
from bot.pool.worker import Worker, WorkerHost, WorkerState

# A spare still starting may be adopted: its conversation waits for it rather than for a new CLI.
_ADOPTABLE = (WorkerState.STARTING, WorkerState.WARM)
# How soon a spare whose CLI is being started is looked for again, to be stopped while a turn runs.
PACE_RETRY_S = 0.02


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
        self._held: set[Worker] = set()  # spares waiting or stopped, adopted ones too until they go on
        self._live_turns = 0
        self._pace_timer: asyncio.TimerHandle | None = None

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

    def started(self) -> None:
        self.backoff.succeeded()

    def exited(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.spare and worker.admitted and not worker.connected:
            self.backoff.failed()

    # -- pacing: spares must not slow live turns ---------------------------------------

    def turn_began(self) -> None:
        self._live_turns += 1
        self.pace()

    def turn_ended(self) -> None:
        self._live_turns -= 1
        self.pace()

    def pace(self) -> None:
        """Starting spares stand still while any turn runs, and go on when none does.

        One not yet started waits to start; one whose CLI runs is stopped with its tree (SIGSTOP) and
        continued (SIGCONT). Its start-up code in the daemon (the sandbox rules list /tmp) runs
        between turns too.

        A CLI's start-up and warm-up take a core for about a second, which on a small host doubles
        the turns running meanwhile. Lower priority cannot be undone unprivileged when the spare is
        adopted, and a start merely begun between turns still overlaps the next ones; a stopped
        process costs nothing and goes on at full speed. Each spare waits and stands still at most
        ``spare_pause_max_s`` in all, so a pool that is never idle still gets its spares, and one
        adopted, retiring or shut down is continued at once (stopped, it would not even act on SIGTERM).
        """
        hold = self._live_turns > 0 and not self._host.stopping
        limit = self._host.settings.pool.spare_pause_max_s
        waits: list[float] = []
        for worker in list({*self.workers, *self._held}):
            left = limit - worker.pacing.pause.stopped_s()
            if hold and worker.starting_spare and left > 0:
                wait_s = self._hold(worker, left)
                if wait_s is not None:
                    waits.append(wait_s)
            else:
                self._let_go(worker)
        self._pace_again(min(waits, default=None))

    def _hold(self, worker: Worker, left_s: float) -> float | None:
        """Keep ``worker`` waiting or stopped; when to look at it again (None: when a turn begins or ends)."""
        if worker.pacing.pause.stopped:
            return left_s
        if not worker.pacing.launching and worker.process is None:  # not started: it waits to start
            worker.pacing.pause.stop(None)
            worker.pacing.start.clear()
        elif (root := _spare_process(worker)) is not None:
            worker.pacing.pause.stop(root)
        elif worker.pacing.launching:
            return PACE_RETRY_S  # its process is about to appear
        else:
            return None
        self._held.add(worker)
        return left_s

    def _let_go(self, worker: Worker) -> None:
        worker.pacing.pause.resume()
        worker.pacing.start.set()
        self._held.discard(worker)

    def _pace_again(self, delay_s: float | None) -> None:
        if self._pace_timer is not None:
            self._pace_timer.cancel()
        self._pace_timer = None if delay_s is None else asyncio.get_running_loop().call_later(delay_s, self.pace)

    def _count(self, profile: Profile) -> int:
        return sum(1 for spare in self.workers if spare.profile == profile)

    async def _fill_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.fill()


def _spare_process(worker: Worker) -> psutil.Process | None:
    """The spare's CLI: the one the SDK named, or while it starts, the daemon's child with its config dir."""
    if worker.process is not None or not worker.pacing.launching:
        return worker.process
    return procs.child_with_env("CLAUDE_CONFIG_DIR", worker.record.config_dir)


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
