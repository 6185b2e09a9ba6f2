"""One CLI process's whole life (``Worker``), and the little it needs of its pool (``WorkerHost``).

A worker connects, serves its queue one turn at a time, and disconnects; the pool decides when it
starts (room) and when it retires. It never sees the pool itself, only ``WorkerHost``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import psutil
import structlog

from bot import metrics, procs
from bot.config import Settings
from bot.core import (
    AgentCrashed,
    AgentError,
    AgentSession,
    ConversationRecord,
    Failure,
    Launcher,
    Profile,
    SessionSpec,
    TurnDone,
)
from bot.pool.serving import TurnServer, crash_failure
from bot.pool.turn import Turn
from bot.status import RSS_HISTORY_SAMPLES, RecentEvents
from bot.telemetry import Telemetry

log = structlog.get_logger(__name__)

LOST_CONTEXT_NOTICE = "(The earlier context of this conversation is no longer available; I started a fresh session.)"


class WorkerState(StrEnum):
    STARTING = "starting"  # waiting for room, or its CLI is starting
    WARM = "warm"  # connected, between turns
    BUSY = "busy"  # serving a turn
    CLOSING = "closing"  # retiring: serves no more turns
    CLOSED = "closed"  # its process has exited


class SpareKeeper(Protocol):
    """What a worker tells its pool's spares: a spare is up, a turn began or ended, a spare may go on."""

    def started(self) -> None:
        """A spare's process is up: spawning spares works again."""

    def fill(self) -> None: ...

    def turn_began(self) -> None: ...

    def turn_ended(self) -> None: ...

    def pace(self) -> None:
        """Hold starting spares while turns run, let them go on otherwise (a worker's state changed)."""


class WorkerHost(Protocol):
    """All a worker reaches of the pool that hosts it: room, persistence, spares, and what it serves with."""

    settings: Settings
    data_dir: Path
    launcher: Launcher
    telemetry: Telemetry
    events: RecentEvents

    @property
    def stopping(self) -> bool: ...

    async def admit(self, worker: Worker) -> bool:
        """Wait for room under the pool's limits; False if refused (its turns are answered then)."""

    async def restore_transcript(self, spec: SessionSpec) -> bool: ...

    async def persist(self, record: ConversationRecord) -> None:
        """Store the record; a store failure is logged, not raised."""

    @property
    def spares(self) -> SpareKeeper: ...

    async def notify_room(self) -> None:
        """This worker went idle: a waiter may now evict it."""

    async def exited(self, worker: Worker) -> None:
        """The process is gone: free its room, store its final record, hand its queued turns on."""


class SparePacing:
    """A spare's start held back while live turns run (``SpareKeeper.pace``): it waits to start, or stands still."""

    def __init__(self) -> None:
        self.launching = False  # its CLI is being started, and the SDK does not name its pid yet
        self.pause = procs.Pause()  # its CLI's tree, stopped (SIGSTOP) while turns run
        self.start = asyncio.Event()  # a spare starts its CLI only when this is set
        self.start.set()

    async def may_start(self) -> None:
        while not self.start.is_set():  # set again, perhaps cleared again before this task ran
            await self.start.wait()


class Worker:
    """Owns one CLI process for its whole life: connect, serve turns, disconnect, sweep its tree."""

    def __init__(
        self,
        host: WorkerHost,
        record: ConversationRecord,
        resume: bool,
        spare: bool,
        profile: Profile,
        predecessor: Worker | None = None,
    ) -> None:
        self.host, self.record, self.resume, self.spare = host, record, resume, spare
        # What this process is started with (tools, MCP servers, prompt): fixed for its life.
        self.profile = profile
        self.predecessor = predecessor
        self.successor: Worker | None = None
        self.queue: deque[Turn] = deque()
        self.current: Turn | None = None
        self.state = WorkerState.STARTING
        self.retire_reason: str | None = None
        self.session: AgentSession | None = None
        self.pid: int | None = None
        self.process: psutil.Process | None = None
        self.tree = procs.ProcessTree()
        self.connected = False
        self.rss_mb: float | None = None
        self.rss_history: deque[float] = deque(maxlen=RSS_HISTORY_SAMPLES)
        self.memory_kill_mb: float | None = None
        self.turns_served = 0
        self.server = TurnServer(host, profile.name)
        self.last_used = time.monotonic()
        self.admitted = False
        self.tenant: str | None = None  # who a per-user cap counts this conversation under
        self.fresh = False
        self.notice: str | None = None
        self.preheated = False
        self.refill_spares = False  # an adopted spare starts its replacement after its first turn
        self.pacing = SparePacing()
        self._wakeup = asyncio.Event()
        self.log = log.bind(conversation=record.conversation_id, session=record.session_id)
        self.task: asyncio.Task[None] = asyncio.create_task(self._run(), name=f"worker:{record.conversation_id}")

    @property
    def idle(self) -> bool:
        return self.state is WorkerState.WARM and not self.queue

    @property
    def busy(self) -> bool:
        """Running a turn, holding queued ones, or waiting for room: what a per-user cap counts."""
        return self.current is not None or bool(self.queue) or (not self.admitted and not self.spare)

    def enqueue(self, turn: Turn) -> None:
        self.queue.append(turn)
        self._wakeup.set()

    def take_over(self, turns: list[Turn]) -> None:
        """Put a predecessor's unserved turns first, in their order, ahead of anything newer."""
        self.queue.extendleft(reversed(turns))
        self._wakeup.set()

    def retire(self, reason: str) -> None:
        if self.retire_reason is None:
            self.retire_reason = reason
            self.state = WorkerState.CLOSING if self.state is not WorkerState.BUSY else self.state
        self._wakeup.set()

    async def interrupt(self) -> None:
        if self.session is not None and self.current is not None:
            await self.session.interrupt()

    @property
    def starting_spare(self) -> bool:
        return self.spare and not self.preheated and self.retire_reason is None and self.state is not WorkerState.CLOSED

    def adopt(self, record: ConversationRecord) -> None:
        self.spare, self.record = False, record
        self.log = log.bind(conversation=record.conversation_id, session=record.session_id)

    def spec(self) -> SessionSpec:
        return session_spec(self.record, self.resume, self.profile, self.host.data_dir)

    def crashed(self, kind: str, detail: str) -> None:
        metrics.CRASHES.labels(kind=kind).inc()
        self.host.events.add("crash", self.record.conversation_id, f"{kind}: {detail}")

    def _idle_deadline(self) -> float:
        return max(self.last_used + self.host.settings.pool.idle_timeout_s - time.monotonic(), 0.0)

    def process_alive(self) -> bool:
        if self.pid is None:  # not connected yet, or a launcher without a process
            return True
        return self.process is not None and procs.still_running(self.process)

    async def _run(self) -> None:
        try:
            if self.predecessor is not None:
                await asyncio.wait([self.predecessor.task])
                self._inherit(self.predecessor.record)
                self.predecessor = None
            # Retired before it ever started (its conversation moved on): no process needed.
            if self.retire_reason is not None or not await self.host.admit(self):
                return
            await self._serve_all()
        except AgentCrashed as exc:
            self.log.error("crash", error=str(exc), pid=self.pid)
            self.crashed("memory" if self.memory_kill_mb is not None else "turn", str(exc)[:200])
        except AgentError as exc:
            self.log.error("spawn_failed", error=str(exc))
            self.fail_queued(Failure.AGENT_ERROR, str(exc))
        except Exception:  # task boundary: a bug here must not take the pool down
            self.log.exception("worker_failed")
            self.fail_queued(Failure.AGENT_ERROR, "internal error")
        finally:
            self.state = WorkerState.CLOSED
            self.host.spares.pace()  # a stopped process is continued before anything terminates it
            await self._sweep_tree()
            await self.host.exited(self)

    async def _sweep_tree(self) -> None:
        """Whatever the CLI left running (a killed CLI's sandbox helper) dies with it."""
        killed = await self.tree.sweep()
        if killed:
            self.log.warning("orphans_killed", pids=killed)

    def _inherit(self, record: ConversationRecord) -> None:
        """Continue from the predecessor's final record: resume its session unless it was reset."""
        self.resume = record.session_id is not None and record.turns > 0
        self.record = record if self.resume else record.replace(session_id=str(uuid.uuid4()), turns=0)
        self.log = log.bind(conversation=self.record.conversation_id, session=self.record.session_id)

    async def _recover_lost_transcript(self) -> None:
        """A resume needs the session's transcript: restore it from the mirror, or else start afresh."""
        if not self.resume or self.record.session_id is None or await _transcript_at_hand(self.host, self.spec()):
            return
        lost, self.record = self.record.session_id, started_afresh(self.record)
        self.resume, self.notice = False, LOST_CONTEXT_NOTICE
        self.log.warning("transcript_lost", lost_session=lost, session=self.record.session_id)

    async def _serve_all(self) -> None:
        await self._recover_lost_transcript()
        if self.spare:
            self.host.spares.pace()
            await self.pacing.may_start()
            if self.retire_reason is not None:
                return  # shut down (or retired) before it ever started
        started = time.monotonic()
        self.pacing.launching = True
        self.host.spares.pace()
        async with self.host.launcher.open(self.spec()) as session:
            self.session, self.pid, self.state, self.connected = session, session.pid, WorkerState.WARM, True
            self.process = procs.handle(self.pid) if self.pid is not None else None
            self.pacing.launching = False
            self.remember_tree()
            seconds = time.monotonic() - started
            metrics.SPAWNS.labels(kind="resume" if self.resume else "spare" if self.spare else "new").inc()
            metrics.SPAWN_SECONDS.observe(seconds)
            self.log.info(
                "resume" if self.resume else "spawn", pid=self.pid, spare=self.spare, seconds=round(seconds, 3)
            )
            if self.spare:
                await self._preheat(session)
            if self.spare:
                self.host.spares.started()
            if not self.spare:
                self.record = self.record.replace(state="warm")
                await self.host.persist(self.record)
            while (turn := await self._next_turn()) is not None:
                await self._serve(session, turn)
                self._check_ceilings()
                if self.refill_spares:
                    self.refill_spares = False
                    self.host.spares.fill()

    async def _preheat(self, session: AgentSession) -> None:
        """A spare's warm-up (answered by the gateway, then cleared): its first real reply is a warm one."""
        started = time.monotonic()
        session_id = await session.preheat()
        if session_id and session_id != self.record.session_id:
            self.record = self.record.replace(session_id=session_id)
            if not self.spare:  # adopted while warming: its stored record must name the session it continues
                await self.host.persist(self.record)
        self.preheated = True
        self.log.info("preheat", seconds=round(time.monotonic() - started, 3), session_after=session_id)

    def remember_tree(self, snapshot: procs.Snapshot | None = None) -> None:
        if self.pid is not None:
            self.tree.remember(self.pid, snapshot)

    async def _next_turn(self) -> Turn | None:
        while True:
            if self.retire_reason is not None:
                return None
            if self.queue:
                return self.queue.popleft() if self._still_alive() else None
            if self.host.stopping:
                self.retire("shutdown")
                continue
            self.state = WorkerState.WARM
            self._wakeup.clear()
            await self.host.notify_room()
            timeout = None if self.spare else self._idle_deadline()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                self.retire("idle")

    def _still_alive(self) -> bool:
        """A CLI that died while idle must not get the next turn: retire, and a successor resumes it."""
        if self.process_alive():
            return True
        self.log.error("died_idle", pid=self.pid)
        self.crashed("idle", f"pid {self.pid} died while idle")
        self.retire("died")
        return False

    async def _serve(self, session: AgentSession, turn: Turn) -> None:
        self.state, self.current = WorkerState.BUSY, turn
        turn.started.set()
        started = time.monotonic()
        self.log.info("turn_start", source=turn.inbound.source, chars=len(turn.inbound.text))
        self.server.trace(turn, time.time_ns())
        self.host.spares.turn_began()  # ended in the finally below: the count stays balanced whatever breaks
        try:
            await self._serve_turn(session, turn, started)
        except AgentCrashed as exc:
            self._close_turn(turn, started)
            ceiling = self.host.settings.pool.hard_ceiling_mb
            turn.fail(*crash_failure(exc, self.memory_kill_mb, ceiling), record=self.record)
            raise
        except TimeoutError:
            self._close_turn(turn, started)
            turn.fail(Failure.TIMEOUT, record=self.record)
            self.retire("timeout")
        except Exception:  # the turn's boundary: whatever broke, this message still gets its one outcome
            self.log.exception("turn_failed")
            self._close_turn(turn, started)
            turn.fail(Failure.AGENT_ERROR, "internal error", record=self.record)
            self.retire("error")
        finally:
            self._close_turn(turn, started)
            self.host.spares.turn_ended()
            if self.host.stopping:
                turn.fail(Failure.SHUTDOWN)
            else:
                turn.fail(Failure.AGENT_ERROR, "internal error")

    async def _serve_turn(self, session: AgentSession, turn: Turn, started: float) -> None:
        notice, self.notice = self.notice, None
        if notice is not None:
            turn.deltas.put_nowait(notice + "\n\n")
        self.remember_tree()
        done = await self.server.run(session, turn, self.record)
        self._end_turn(turn, done, started)
        turn.finish(self.server.outcome(done, self.record, notice))
        await self.host.persist(self.record)

    def _close_turn(self, turn: Turn, started: float) -> None:
        if self.current is turn:
            self._end_turn(turn, None, started)

    def _end_turn(self, turn: Turn, done: TurnDone | None, started: float) -> None:
        cost = self.server.cost(done, self.log)
        self.turns_served += 1
        self.current, self.last_used = None, time.monotonic()
        if self.state is WorkerState.BUSY:
            self.state = WorkerState.CLOSING if self.retire_reason else WorkerState.WARM
        self.record = after_turn(self.record, cost, done.session_id if done is not None else self.record.session_id)
        if done is not None and done.budget is not None:
            self.host.events.add("budget_stop", self.record.conversation_id, done.budget)
        seconds = time.monotonic() - started
        metrics.TURN_SECONDS.observe(seconds)
        self.log.info(
            "turn_end", seconds=round(seconds, 3), cost_usd=round(cost, 6), ok=done is not None and done.error is None
        )

    def _check_ceilings(self) -> None:
        limits = self.host.settings.pool
        if self.pid is not None:
            self.note_rss(procs.tree_rss_mb(self.pid))
            self.remember_tree()
        if self.rss_mb is not None and self.rss_mb > limits.session_max_rss_mb:
            self.retire("memory")
        elif self.turns_served >= limits.session_max_turns:
            self.retire("turns")

    def fail_queued(self, failure: Failure, detail: str | None = None) -> None:
        while self.queue:
            self.queue.popleft().fail(failure, detail, record=self.record)

    def note_rss(self, rss_mb: float | None) -> None:
        self.rss_mb = rss_mb
        if rss_mb is not None:
            self.rss_history.append(round(rss_mb, 1))

    @property
    def shown_state(self) -> WorkerState:
        return WorkerState.BUSY if self.current is not None else self.state


def transcript_exists(config_dir: Path, session_id: str) -> bool:
    """The CLI keeps a session's transcript at ``<config>/projects/<encoded cwd>/<session>.jsonl``."""
    return any(config_dir.glob(f"projects/*/{session_id}.jsonl"))


def session_spec(record: ConversationRecord, resume: bool, profile: Profile, data_dir: Path) -> SessionSpec:
    assert record.session_id is not None
    return SessionSpec(
        conversation_id=record.conversation_id,
        workdir=Path(record.workdir),
        config_dir=Path(record.config_dir),
        data_dir=data_dir,
        session_id=record.session_id,
        resume=resume,
        profile=profile,
    )


def started_afresh(record: ConversationRecord) -> ConversationRecord:
    """A new session for a conversation whose transcript is lost; the old session id is kept on record."""
    assert record.session_id is not None
    return record.replace(
        session_id=str(uuid.uuid4()),
        turns=0,
        previous_session_ids=(*record.previous_session_ids, record.session_id),
    )


async def _transcript_at_hand(host: WorkerHost, spec: SessionSpec) -> bool:
    """The session's transcript is on disk, or restored there from the mirror."""
    if transcript_exists(spec.config_dir, spec.session_id):
        return True
    restored = await host.restore_transcript(spec)
    if restored:
        log.info("transcript_restored", conversation=spec.conversation_id, session=spec.session_id)
    return restored


def after_turn(record: ConversationRecord, cost_usd: float, session_id: str | None) -> ConversationRecord:
    """The record once a turn has ended (answered or not): one more turn, its cost, the session it left."""
    return record.replace(
        turns=record.turns + 1, cost_usd=record.cost_usd + cost_usd, session_id=session_id, state="warm"
    )
