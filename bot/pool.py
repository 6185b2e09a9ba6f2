"""The warm session pool: one long-lived task per live CLI process.

Routing (``submit``) is synchronous after at most one store read, so under
asyncio it cannot interleave with eviction decisions.  A worker is retired only
between turns; its queued turns, if any, move to the front of its successor's
queue, in order, and the successor resumes the same Claude session once the old
process has exited.  A process holds its room (``max_sessions``, memory budget)
from admission until it has exited, retiring or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog

from bot import eviction, fairness, files, metrics, procs
from bot.config import Settings
from bot.core import (
    AgentCrashed,
    AgentError,
    AgentSession,
    ConversationRecord,
    Failure,
    Inbound,
    Launcher,
    Outcome,
    Profile,
    SessionInfo,
    SessionSpec,
    Store,
    StoreError,
    TextDelta,
    TranscriptSource,
    TurnContext,
    TurnDone,
)
from bot.security import safe_name
from bot.status import RSS_HISTORY_SAMPLES, PoolStatus, PoolTotals, RecentEvents, SessionStatus
from bot.telemetry import DISABLED, Telemetry

log = structlog.get_logger(__name__)

FAILURE_TEXT = {
    Failure.BUSY: "The agent is busy with an earlier message here; send this again when it has answered.",
    Failure.QUEUE_FULL: "Too many messages are waiting in this conversation; this one was not accepted.",
    Failure.CRASHED: "The agent process stopped unexpectedly; the next message resumes the conversation.",
    Failure.MEMORY: "The agent exceeded its memory ceiling and was stopped; the next message resumes the conversation.",
    Failure.TIMEOUT: "The agent took too long and was stopped; the next message resumes the conversation.",
    Failure.INTERRUPTED: "This turn was stopped before it finished.",
    Failure.AGENT_ERROR: "The agent could not complete this turn.",
    Failure.SHUTDOWN: "The daemon is shutting down; this message was not processed.",
    Failure.STORE: "The conversation store is unreachable; try again shortly.",
    Failure.BUDGET: "A spending limit stopped this turn.",
    Failure.POOL_BUSY: "Every agent is busy right now and this message could not get a turn in time; "
    "send it again shortly.",
    Failure.USER_LIMIT: "You already have as many conversations running or waiting as one person may; "
    "send this again when one of them has answered.",
}


def _failure_of(done: TurnDone) -> Failure | None:
    if done.budget is not None:
        return Failure.BUDGET
    if done.interrupted:
        return Failure.INTERRUPTED
    return Failure.AGENT_ERROR if done.error else None


LOST_CONTEXT_NOTICE = "(The earlier context of this conversation is no longer available; I started a fresh session.)"


@dataclass(eq=False)
class Turn:
    """One inbound message in flight: streamed text, then exactly one outcome."""

    inbound: Inbound
    deltas: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    outcome: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(self) -> AsyncIterator[str]:
        while (text := await self.deltas.get()) is not None:
            yield text

    def finish(self, outcome: Outcome) -> None:
        if not self.outcome.done():
            metrics.TURNS.labels(outcome=outcome.failure or "ok").inc()
            self.outcome.set_result(outcome)
            self.deltas.put_nowait(None)

    def fail(self, failure: Failure, detail: str | None = None, record: ConversationRecord | None = None) -> None:
        message = FAILURE_TEXT[failure] + (f" ({detail})" if detail else "")
        self.finish(
            Outcome(
                conversation_id=self.inbound.conversation_id,
                reply="",
                session_id=record.session_id if record else None,
                cost_usd=0.0,
                turns=record.turns if record else 0,
                failure=failure,
                error=message,
            )
        )


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

    def spare_started(self) -> None:
        """A spare's process is up: spawning spares works again."""

    def fill_spares(self) -> None: ...

    async def notify_room(self) -> None:
        """This worker went idle: a waiter may now evict it."""

    async def exited(self, worker: Worker) -> None:
        """The process is gone: free its room, store its final record, hand its queued turns on."""


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
        self.state = "starting"
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
        self.cost_base = 0.0
        self.last_used = time.monotonic()
        self.admitted = False
        self.tenant: str | None = None  # who a per-user cap counts this conversation under
        self.fresh = False
        self.notice: str | None = None
        self.preheated = False
        self.refill_spares = False  # an adopted spare starts its replacement after its first turn
        self.last_turn_cost = 0.0
        self._wakeup = asyncio.Event()
        self.log = log.bind(conversation=record.conversation_id, session=record.session_id)
        self.task: asyncio.Task[None] = asyncio.create_task(self._run(), name=f"worker:{record.conversation_id}")

    @property
    def idle(self) -> bool:
        return self.state == "warm" and not self.queue

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
            self.state = "closing" if self.state != "busy" else self.state
        self._wakeup.set()

    async def interrupt(self) -> None:
        if self.session is not None and self.current is not None:
            await self.session.interrupt()

    def adopt(self, record: ConversationRecord) -> None:
        self.spare, self.record = False, record
        self.log = log.bind(conversation=record.conversation_id, session=record.session_id)

    def spec(self) -> SessionSpec:
        assert self.record.session_id is not None
        return SessionSpec(
            conversation_id=self.record.conversation_id,
            workdir=Path(self.record.workdir),
            config_dir=Path(self.record.config_dir),
            data_dir=self.host.data_dir,
            session_id=self.record.session_id,
            resume=self.resume,
            profile=self.profile,
        )

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
            self.state = "closed"
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
        if not self.resume or self.record.session_id is None:
            return
        if transcript_exists(Path(self.record.config_dir), self.record.session_id):
            return
        if await self.host.restore_transcript(self.spec()):
            self.log.info("transcript_restored")
            return
        lost = self.record.session_id
        self.record = self.record.replace(
            session_id=str(uuid.uuid4()),
            turns=0,
            previous_session_ids=(*self.record.previous_session_ids, lost),
        )
        self.resume, self.notice = False, LOST_CONTEXT_NOTICE
        self.log.warning("transcript_lost", lost_session=lost, session=self.record.session_id)

    async def _serve_all(self) -> None:
        await self._recover_lost_transcript()
        started = time.monotonic()
        async with self.host.launcher.open(self.spec()) as session:
            self.session, self.pid, self.state, self.connected = session, session.pid, "warm", True
            self.process = procs.handle(self.pid) if self.pid is not None else None
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
                self.host.spare_started()
            if not self.spare:
                self.record = self.record.replace(state="warm")
                await self.host.persist(self.record)
            while (turn := await self._next_turn()) is not None:
                await self._serve(session, turn)
                self._check_ceilings()
                if self.refill_spares:
                    self.refill_spares = False
                    self.host.fill_spares()

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
            self.state = "warm"
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
        self.state, self.current = "busy", turn
        turn.started.set()
        started, started_ns = time.monotonic(), time.time_ns()
        self.log.info("turn_start", source=turn.inbound.source, chars=len(turn.inbound.text))
        turn.outcome.add_done_callback(lambda done: self._trace(done, turn, started_ns))
        try:
            await self._serve_turn(session, turn, started)
        except AgentCrashed as exc:
            self._close_turn(turn, started)
            turn.fail(*self._crash_failure(exc), record=self.record)
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
            if self.host.stopping:
                turn.fail(Failure.SHUTDOWN)
            else:
                turn.fail(Failure.AGENT_ERROR, "internal error")

    def _trace(self, done: asyncio.Future[Outcome], turn: Turn, started_ns: int) -> None:
        if not done.cancelled():
            self.host.telemetry.record_turn(done.result(), self.profile.name, turn.inbound.source, started_ns)

    async def _serve_turn(self, session: AgentSession, turn: Turn, started: float) -> None:
        notice, self.notice = self.notice, None
        if notice is not None:
            turn.deltas.put_nowait(notice + "\n\n")
        self.remember_tree()
        done = await self._run_turn(session, turn, self._prompt(turn))
        self._end_turn(turn, done, started)
        outcome = self._outcome(turn, done)
        if notice is not None:
            outcome = dataclasses.replace(outcome, reply=f"{notice}\n\n{outcome.reply}")
        turn.finish(outcome)
        await self.host.persist(self.record)

    def _close_turn(self, turn: Turn, started: float) -> None:
        if self.current is turn:
            self._end_turn(turn, None, started)

    def _prompt(self, turn: Turn) -> str:
        if not turn.inbound.files:
            return turn.inbound.text
        placed = files.move_into_inbox(turn.inbound.files, Path(self.record.workdir))
        return turn.inbound.text + files.attachment_note(placed)

    async def _run_turn(self, session: AgentSession, turn: Turn, prompt: str) -> TurnDone:
        async with asyncio.timeout(self.host.settings.agent.turn_timeout_s):
            inbound = turn.inbound
            context = TurnContext(self.record.conversation_id, inbound.user, inbound.source, inbound.approver)
            async for event in session.turn(prompt, context):
                if isinstance(event, TextDelta):
                    turn.deltas.put_nowait(event.text)
                else:
                    return event
        raise AgentCrashed("the agent's turn ended without a result")

    def _end_turn(self, turn: Turn, done: TurnDone | None, started: float) -> None:
        cost = 0.0
        if done is not None:
            cost = self._turn_cost(done)
        self.turns_served += 1
        self.current, self.last_used = None, time.monotonic()
        if self.state == "busy":
            self.state = "closing" if self.retire_reason else "warm"
        session_id = done.session_id if done is not None else self.record.session_id
        self.record = self.record.replace(
            turns=self.record.turns + 1,
            cost_usd=self.record.cost_usd + cost,
            session_id=session_id,
            state="warm",
        )
        self.last_turn_cost = cost
        if done is not None and done.budget is not None:
            self.host.events.add("budget_stop", self.record.conversation_id, done.budget)
        seconds = time.monotonic() - started
        metrics.TURN_SECONDS.observe(seconds)
        self.log.info(
            "turn_end", seconds=round(seconds, 3), cost_usd=round(cost, 6), ok=done is not None and done.error is None
        )

    def _turn_cost(self, done: TurnDone) -> float:
        """The gateway's metered cost when there is one (cross-checked with the CLI's own counter), else the CLI's."""
        reported = max(done.total_cost_usd - self.cost_base, 0.0)
        self.cost_base = done.total_cost_usd
        if done.metered_usd is None:
            return reported
        if abs(done.metered_usd - reported) > max(1e-6, 0.05 * max(done.metered_usd, reported)):
            self.log.warning("cost_mismatch", metered_usd=round(done.metered_usd, 6), cli_usd=round(reported, 6))
        return done.metered_usd

    def _outcome(self, turn: Turn, done: TurnDone) -> Outcome:
        failure = _failure_of(done)
        parking = self.host.data_dir / "sent" / Path(self.record.workdir).name
        return Outcome(
            files=files.take_outbox(Path(self.record.workdir), parking),
            conversation_id=self.record.conversation_id,
            reply=done.reply,
            session_id=done.session_id,
            cost_usd=self.last_turn_cost,
            turns=self.record.turns,
            failure=failure,
            error=None
            if failure is None
            else f"{FAILURE_TEXT[failure]} ({done.budget or done.error or 'interrupted'})",
        )

    def _crash_failure(self, exc: AgentCrashed) -> tuple[Failure, str]:
        if self.memory_kill_mb is not None:
            ceiling = self.host.settings.pool.hard_ceiling_mb
            return Failure.MEMORY, f"{self.memory_kill_mb:.0f} MiB > {ceiling} MiB"
        return Failure.CRASHED, str(exc)[:200]

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
    def shown_state(self) -> str:
        return "busy" if self.current is not None else "warm" if self.state == "warm" else self.state

    def status(self) -> SessionStatus:
        return SessionStatus(
            conversation_id=self.record.conversation_id,
            profile=self.profile.name,
            state=self.shown_state,
            pid=self.pid,
            rss_mb=None if self.rss_mb is None else round(self.rss_mb, 1),
            rss_history_mb=tuple(self.rss_history),
            turns=self.record.turns,
            idle_s=round(time.monotonic() - self.last_used, 1),
            queued=len(self.queue),
        )

    def info(self) -> SessionInfo:
        state = self.shown_state
        return SessionInfo(
            conversation_id=self.record.conversation_id,
            session_id=self.record.session_id,
            state=state,
            pid=self.pid,
            rss_mb=None if self.rss_mb is None else round(self.rss_mb, 1),
            turns=self.record.turns,
            idle_s=round(time.monotonic() - self.last_used, 1),
            cost_usd=round(self.record.cost_usd, 6),
        )


def _remove_series(pid: str) -> None:
    with contextlib.suppress(KeyError):  # another pool in this process may have removed it (tests run several)
        metrics.PROCESS_RSS_BYTES.remove(pid)


def transcript_exists(config_dir: Path, session_id: str) -> bool:
    """The CLI keeps a session's transcript at ``<config>/projects/<encoded cwd>/<session>.jsonl``."""
    return any(config_dir.glob(f"projects/*/{session_id}.jsonl"))


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


_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


class Pool:
    def __init__(
        self,
        settings: Settings,
        launcher: Launcher,
        store: Store,
        telemetry: Telemetry = DISABLED,
        transcripts: TranscriptSource | None = None,
    ) -> None:
        self.settings, self.launcher, self.store = settings, launcher, store
        self.telemetry = telemetry  # a span per served turn
        self.transcripts = transcripts
        self.data_dir = settings.store.data_dir.resolve()
        self._profiles: dict[str, Profile] = {}
        self._workers: dict[str, Worker] = {}
        self._retiring: dict[str, Worker] = {}
        self._spares: list[Worker] = []
        _POOLS.add(self)
        self._admitted: set[Worker] = set()
        self._room = asyncio.Condition()
        # Conversations waiting for room, in arrival order; the fair one among them goes first.
        self._waiting: dict[Worker, fairness.Waiter] = {}
        self._arrivals = itertools.count()
        # How often each conversation is used lately: eviction keeps the busy ones warm (bot/eviction.py).
        self._frequency = eviction.Frequency(window=10 * settings.pool.max_sessions)
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._spare_backoff = SpareBackoff()
        self._spare_timer: asyncio.Task[None] | None = None
        self.events = RecentEvents()
        self._rss_pids: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        # A CLI killed from outside leaves its sandbox helper behind; as subreaper we inherit and reap it.
        if not procs.become_subreaper():
            log.warning("subreaper_unavailable")
        # What a crashed daemon of this data dir left behind (processes a parent-death signal missed).
        leftovers = await asyncio.to_thread(procs.sweep_leftovers, self.data_dir)
        if leftovers:
            log.warning("leftovers_reaped", processes=[f"{pid} {name}" for pid, name in leftovers])
        self._monitor = asyncio.create_task(self._sample_forever(), name="pool:rss")
        self.fill_spares()

    async def close(self, grace_s: float) -> None:
        """Stop intake, let queued turns finish within ``grace_s``, then cancel the rest."""
        self._stopping = True
        workers = self._all_workers()
        for worker in workers:
            if not worker.queue and worker.current is None:
                worker.retire("shutdown")
        tasks = [w.task for w in workers]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s if grace_s > 0 else None)
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        for worker in self._all_workers():
            worker.task.cancel()
        tasks = [w.task for w in self._all_workers()] + list(self._background)
        for helper in (self._monitor, self._spare_timer):
            if helper is not None:
                helper.cancel()
                tasks.append(helper)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
        for worker in self._all_workers():
            if worker.pid is not None:
                procs.kill_tree(worker.pid)

    def _all_workers(self) -> list[Worker]:
        return list({*self._workers.values(), *self._retiring.values(), *self._spares, *self._admitted})

    # -- intake ------------------------------------------------------------------

    def profile(self, name: str) -> Profile:
        """The named profile, resolved once; a name the config no longer has falls back to ``chat``."""
        if name not in self._profiles:
            try:
                self._profiles[name] = self.settings.profile(name)
            except KeyError:
                log.error("profile_missing", profile=name, fallback="chat")
                self._profiles[name] = dataclasses.replace(self.settings.profile("chat"), name=name)
        return self._profiles[name]

    async def submit(self, inbound: Inbound) -> Turn:
        turn = Turn(inbound)
        self._frequency.touch(inbound.conversation_id)
        if self._stopping:
            turn.fail(Failure.SHUTDOWN)
            return turn
        worker = self._live(inbound.conversation_id)
        if worker is None:
            try:
                record = await self.store.get(inbound.conversation_id)
            except StoreError as exc:
                log.error("store_error", conversation=inbound.conversation_id, error=str(exc))
                turn.fail(Failure.STORE)
                return turn
            # A conversation keeps the profile it was created with; a new one takes the message's.
            profile = self.profile(record.profile if record is not None else inbound.profile)
            worker = self._live(inbound.conversation_id)
            if worker is None:
                tenant = fairness.tenant_of(inbound.user)
                if fairness.over_cap(tenant, self._busy_tenants(), self._cap_for(tenant)):
                    log.warning("admission_user_limit", conversation=inbound.conversation_id, tenant=tenant)
                    metrics.ADMISSION_REFUSED.labels(reason="user_limit").inc()
                    turn.fail(Failure.USER_LIMIT)
                    return turn
                worker = self._start_conversation(inbound.conversation_id, record, profile)
                worker.tenant = tenant
        self._route(worker, turn)
        return turn

    async def ask(self, inbound: Inbound) -> Outcome:
        turn = await self.submit(inbound)
        return await turn.outcome

    def _cap_for(self, tenant: str | None) -> int:
        limits = self.settings.pool
        return limits.max_busy_per_domain if fairness.is_domain(tenant) else limits.max_busy_per_user

    def _busy_tenants(self) -> list[str | None]:
        return [w.tenant for w in self._workers.values() if w.retire_reason is None and w.busy]

    def _live(self, conversation_id: str) -> Worker | None:
        worker = self._workers.get(conversation_id)
        return worker if worker is not None and worker.retire_reason is None else None

    def _route(self, worker: Worker, turn: Turn) -> None:
        policy = "queue" if turn.inbound.waits else self.settings.pool.busy_policy
        waiting = len(worker.queue) + (worker.current is not None)
        if policy == "reject" and waiting:
            turn.fail(Failure.BUSY, record=worker.record)
        elif len(worker.queue) >= self.settings.pool.queue_limit:
            turn.fail(Failure.QUEUE_FULL, record=worker.record)
        else:
            worker.enqueue(turn)
            if policy == "interrupt" and worker.current is not None:
                self._spawn_background(worker.interrupt())

    def _start_conversation(self, conversation_id: str, record: ConversationRecord | None, profile: Profile) -> Worker:
        previous = self._workers.pop(conversation_id, None)
        if previous is not None:
            # The successor takes the predecessor's final record once it has exited.
            self._retiring[conversation_id] = previous
            worker = Worker(self, previous.record, resume=False, spare=False, profile=profile, predecessor=previous)
            previous.successor = worker
        elif record is None:
            spare = self._take_spare(profile)
            if spare is not None:
                return self._adopt(spare, conversation_id)
            record = self._new_record(conversation_id, safe_name(conversation_id), profile.name)
            worker = Worker(self, record, resume=False, spare=False, profile=profile)
        else:
            resumable = record.session_id is not None and record.turns > 0
            if not resumable:
                record = record.replace(session_id=str(uuid.uuid4()))
            worker = Worker(self, record, resume=resumable, spare=False, profile=profile)
        self._workers[conversation_id] = worker
        return worker

    def _take_spare(self, profile: Profile) -> Worker | None:
        conversations = sum(1 for w in self._admitted if not w.spare)
        if conversations >= self.settings.pool.max_sessions:
            return None
        for spare in self._spares:
            # Spares are per profile: tools and MCP servers are fixed when a process starts.
            if spare.profile == profile and spare.retire_reason is None and spare.state in ("starting", "warm"):
                self._spares.remove(spare)
                return spare
        return None

    def _adopt(self, spare: Worker, conversation_id: str) -> Worker:
        workdir_name = Path(spare.record.workdir).name
        record = self._new_record(conversation_id, workdir_name, spare.profile.name, spare.record.session_id)
        spare.adopt(record)
        self._workers[conversation_id] = spare
        spare.log.info("adopt_spare", workdir=workdir_name)
        self._spawn_background(self.persist(record))
        # The replacement spare is started after this conversation's first reply: a CLI start-up
        # takes a core for most of a second, and would slow exactly the reply the spare is for.
        spare.refill_spares = True
        return spare

    def _new_record(
        self, conversation_id: str, name: str, profile: str, session_id: str | None = None
    ) -> ConversationRecord:
        now = time.time()
        return ConversationRecord(
            conversation_id=conversation_id,
            workdir=str(self.data_dir / "work" / name),
            config_dir=str(self.data_dir / "state" / name / "claude"),
            session_id=session_id or str(uuid.uuid4()),
            profile=profile,
            state="starting",
            created_at=now,
            updated_at=now,
        )

    async def restore_transcript(self, spec: SessionSpec) -> bool:
        if self.transcripts is None:
            return False
        try:
            return await self.transcripts.restore(spec)
        except StoreError as exc:  # Redis down: the conversation goes on afresh rather than not at all
            log.warning("transcript_restore_failed", conversation=spec.conversation_id, error=str(exc))
            return False

    # -- spares ------------------------------------------------------------------

    def fill_spares(self) -> None:
        wait_s = self._spare_backoff.wait_s()
        if wait_s > 0:
            if self._spare_timer is None or self._spare_timer.done():
                self._spare_timer = asyncio.create_task(self._fill_spares_after(wait_s), name="pool:spares")
            return
        for profile_name, wanted in self.settings.pool.prewarm_by_profile.items():
            profile = self.profile(profile_name)
            while not self._stopping and self._spare_count(profile) < wanted and self._spare_fits():
                name = f"spare-{uuid.uuid4().hex[:12]}"
                record = self._new_record(f"spare:{name}", name, profile.name)
                self._spares.append(Worker(self, record, resume=False, spare=True, profile=profile))

    def _spare_count(self, profile: Profile) -> int:
        return sum(1 for spare in self._spares if spare.profile == profile)

    async def _fill_spares_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.fill_spares()

    def spare_started(self) -> None:
        self._spare_backoff.succeeded()

    # -- room --------------------------------------------------------------------

    async def admit(self, worker: Worker) -> bool:
        """Wait until ``worker`` fits under max_sessions and the memory budget, and it is its turn.

        A process keeps its room until it has exited, so a retiring one still counts; eviction
        retires only as many idle processes as the room still missing after those. Conversations
        wait in a bounded queue, each at most ``admission_timeout_s``, and free room goes to the
        fairest waiter (``bot.fairness``); one refused here has its messages answered "busy".
        """
        async with self._room:
            if worker.spare or (self._fits(worker) and not self._waiting):
                return self._admit_now(worker)
            if self._stopping:
                return False
            if len(self._waiting) >= self.settings.pool.admission_queue_limit:
                return self._refuse(worker, "queue_full")
            self._waiting[worker] = fairness.Waiter(worker.tenant, next(self._arrivals))
            try:
                return await self._wait_for_room(worker)
            finally:
                del self._waiting[worker]
                self._room.notify_all()  # the next waiter may be the fair one now

    async def _wait_for_room(self, worker: Worker) -> bool:
        deadline = time.monotonic() + self.settings.pool.admission_timeout_s
        while not (self._is_next(worker) and self._fits(worker)):
            if self._stopping:
                return False
            victim = self._victim() if self._is_next(worker) else None
            if victim is not None:
                victim.retire("room")
                continue
            try:
                await asyncio.wait_for(self._room.wait(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                return self._refuse(worker, "timeout")
        return self._admit_now(worker)

    def _is_next(self, worker: Worker) -> bool:
        tenants = (w.tenant for w in self._admitted if not w.spare)
        return fairness.next_waiter(list(self._waiting.values()), tenants) == self._waiting[worker]

    def _admit_now(self, worker: Worker) -> bool:
        if not self._fits(worker):
            return False  # only a spare gets here without room: it is simply not started
        worker.admitted = True
        self._admitted.add(worker)
        return True

    def _refuse(self, worker: Worker, reason: str) -> bool:
        worker.log.warning("admission_refused", reason=reason, tenant=worker.tenant)
        metrics.ADMISSION_REFUSED.labels(reason=reason).inc()
        worker.retire("busy")
        worker.fail_queued(Failure.POOL_BUSY)
        return False

    def _fits(self, worker: Worker) -> bool:
        if worker.spare:
            return self._spare_fits(exclude=worker)
        limits = self.settings.pool
        conversations = sum(1 for w in self._admitted if not w.spare)
        processes = len(self._admitted)
        return (
            conversations < limits.max_sessions
            and processes < limits.max_sessions + limits.spares_total
            and self._memory_used(self._admitted) + limits.spawn_estimate_mb <= limits.memory_budget_mb
        )

    def _spare_fits(self, exclude: Worker | None = None) -> bool:
        limits = self.settings.pool
        pending = sum(1 for s in self._spares if not s.admitted and s is not exclude)
        processes = len(self._admitted) + pending
        return processes < limits.max_sessions + limits.spares_total and self._memory_fits()

    def _memory_fits(self) -> bool:
        limits = self.settings.pool
        return self._memory_used(self._admitted) + limits.spawn_estimate_mb <= limits.memory_budget_mb

    def _memory_used(self, workers: Iterable[Worker]) -> float:
        estimate = self.settings.pool.spawn_estimate_mb
        return sum(w.rss_mb or estimate for w in workers)

    def _victim(self) -> Worker | None:
        """The next idle process to retire for room, or None when the retiring ones already cover it."""
        limits = self.settings.pool
        staying = [w for w in self._admitted if w.retire_reason is None]
        sessions_short = sum(1 for w in staying if not w.spare) >= limits.max_sessions
        processes_short = len(staying) >= limits.max_sessions + limits.spares_total
        memory_short = self._memory_used(staying) + limits.spawn_estimate_mb > limits.memory_budget_mb
        idle = [w for w in staying if w.idle]
        if sessions_short:
            # Retiring a spare frees no conversation slot.
            idle = [w for w in idle if not w.spare]
        elif not (processes_short or memory_short):
            return None
        return min(idle, key=self._eviction_order, default=None)

    def _eviction_order(self, worker: Worker) -> tuple[bool, int, float]:
        """Spares first; then the least used lately (``lfu``; all equal under ``lru``); then the least recent."""
        used = self._frequency.count(worker.record.conversation_id) if self.settings.pool.eviction == "lfu" else 0
        return (not worker.spare, used, worker.last_used)

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    # -- exits and persistence -----------------------------------------------------

    async def exited(self, worker: Worker) -> None:
        cid = worker.record.conversation_id
        if not worker.spare:
            worker.record = self._exit_record(worker)
            await self.persist(worker.record)
        self._admitted.discard(worker)
        if self._workers.get(cid) is worker:
            del self._workers[cid]
        if self._retiring.get(cid) is worker:
            del self._retiring[cid]
        if worker in self._spares:
            self._spares.remove(worker)
        if worker.spare and worker.admitted and not worker.connected:
            self._spare_backoff.failed()
        self._forget_rss(worker)
        if worker.retire_reason is not None and worker.admitted:
            metrics.EVICTIONS.labels(reason=worker.retire_reason).inc()
            if not worker.spare:
                self.events.add("evict", cid, worker.retire_reason)
            worker.log.info("evict", reason=worker.retire_reason, turns=worker.turns_served, rss_mb=worker.rss_mb)
        leftovers = list(worker.queue)
        worker.queue.clear()
        self._hand_over(worker, leftovers)
        await self.notify_room()
        if worker.admitted:
            self.fill_spares()

    def _exit_record(self, worker: Worker) -> ConversationRecord:
        record = worker.record.replace(state="evicted", evict_reason=worker.retire_reason or "exit")
        return record.replace(session_id=None, turns=0) if worker.fresh else record

    def _hand_over(self, worker: Worker, turns: list[Turn]) -> None:
        """Unserved turns go, in order, to the front of the successor's queue (started here if none yet)."""
        if not turns:
            return
        if self._stopping:
            for turn in turns:
                turn.fail(Failure.SHUTDOWN)
            return
        successor = worker.successor
        if successor is None or successor.state == "closed":
            cid = worker.record.conversation_id
            successor = self._live(cid) or self._start_conversation(cid, worker.record, worker.profile)
        successor.take_over(turns)

    async def persist(self, record: ConversationRecord) -> None:
        try:
            await self.store.put(record)
        except StoreError as exc:
            metrics.STORE_ERRORS.inc()
            log.error("store_error", conversation=record.conversation_id, error=str(exc))

    def _spawn_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- memory and liveness sampling ------------------------------------------------

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.pool.rss_sample_s)
            try:
                # Reading /proc is the costly part (all processes, once), so it runs off the event loop.
                self.sample(await asyncio.to_thread(procs.Snapshot.take))
            except Exception:  # task boundary: the memory kill must outlive one bad sample
                log.exception("rss_sample_failed")

    def sample(self, snapshot: procs.Snapshot | None = None) -> None:
        """Every live CLI tree's RSS from one snapshot of /proc (taken here when none is given)."""
        snapshot = snapshot or procs.Snapshot.take()
        for worker in list(self._admitted):
            if worker.pid is not None and worker.state != "closed":
                self._sample_worker(worker, snapshot)
        # Every pool's CLIs are asyncio's to reap, not only this one's (tests and benchmarks run several).
        own = {w.pid for pool in _POOLS for w in pool._all_workers() if w.pid is not None}
        procs.reap_orphans(own, snapshot=snapshot)
        self._export_gauges()

    def _export_gauges(self) -> None:
        live = [w for w in self._admitted if w.state != "closed"]
        metrics.LIVE_SESSIONS.set(len(live))
        metrics.POOL_RSS_BYTES.set(sum(w.rss_mb or 0.0 for w in live) * metrics.MIB)
        metrics.QUEUE_DEPTH.set(sum(len(w.queue) for w in self._all_workers()))
        states = Counter("spare" if w.spare else w.shown_state for w in live)
        for state in ("starting", "warm", "busy", "closing", "spare"):
            metrics.SESSIONS_BY_STATE.labels(state=state).set(states[state])
        metrics.SESSIONS_BY_PROFILE.clear()
        for profile, count in Counter(w.profile.name for w in live).items():
            metrics.SESSIONS_BY_PROFILE.labels(profile=profile).set(count)
        exported = {str(w.pid): w.rss_mb for w in live if w.pid is not None and w.rss_mb is not None}
        for pid in self._rss_pids - exported.keys():
            _remove_series(pid)
        for pid, rss_mb in exported.items():
            metrics.PROCESS_RSS_BYTES.labels(pid=pid).set(rss_mb * metrics.MIB)
        self._rss_pids = set(exported)

    def _forget_rss(self, worker: Worker) -> None:
        """A pid's series goes with its process: pids are reused, and a dead one must not show memory."""
        pid = str(worker.pid)
        if pid in self._rss_pids:
            self._rss_pids.discard(pid)
            _remove_series(pid)

    def _sample_worker(self, worker: Worker, snapshot: procs.Snapshot) -> None:
        assert worker.pid is not None
        limits = self.settings.pool
        worker.remember_tree(snapshot)
        if worker.retire_reason is None or worker.current is not None:
            # A retiring process keeps its last figure until it has exited: the budget must not count
            # a tree that is halfway through shutting down as already freed.
            worker.note_rss(snapshot.tree_rss_mb(worker.pid))
        if not worker.process_alive():
            self._process_gone(worker)
        elif worker.rss_mb is None:
            return
        elif worker.current is not None and worker.rss_mb > limits.hard_ceiling_mb:
            worker.memory_kill_mb = worker.rss_mb
            worker.log.error("memory_kill", rss_mb=round(worker.rss_mb), ceiling_mb=limits.hard_ceiling_mb)
            procs.kill_tree(worker.pid)
        elif worker.idle and worker.rss_mb > limits.session_max_rss_mb:
            worker.retire("memory")

    def _process_gone(self, worker: Worker) -> None:
        """The CLI died from outside: kill what it left (its helper may hold its output open), retire it if idle."""
        worker.tree.kill_survivors()
        if worker.current is None and worker.retire_reason is None:
            worker.log.error("died_idle", pid=worker.pid)
            worker.crashed("idle", f"pid {worker.pid} died while idle")
            worker.retire("died")

    # -- introspection -------------------------------------------------------------

    def status(self) -> PoolStatus:
        """Live conversation processes (retiring ones too), the totals against their limits, recent events."""
        workers = sorted({*self._workers.values(), *self._retiring.values()}, key=lambda w: w.record.conversation_id)
        limits = self.settings.pool
        live = [w for w in self._admitted if w.state != "closed"]
        totals = PoolTotals(
            sessions=sum(1 for w in live if not w.spare),
            max_sessions=limits.max_sessions,
            spares=sum(1 for w in live if w.spare),
            rss_mb=round(sum(w.rss_mb or 0.0 for w in live), 1),
            memory_budget_mb=limits.memory_budget_mb,
            queued=sum(len(w.queue) for w in self._all_workers()),
        )
        return PoolStatus(tuple(w.status() for w in workers), totals, self.events.items())

    async def sessions(self) -> list[SessionInfo]:
        live = {w.record.conversation_id: w.info() for w in self._workers.values()}
        try:
            records = await self.store.records()
        except StoreError as exc:
            log.error("store_error", error=str(exc))
            records = []
        rows = dict(live)
        for record in records:
            if record.conversation_id not in rows:
                rows[record.conversation_id] = SessionInfo(
                    conversation_id=record.conversation_id,
                    session_id=record.session_id,
                    state="evicted",
                    pid=None,
                    rss_mb=None,
                    turns=record.turns,
                    idle_s=None,
                    cost_usd=round(record.cost_usd, 6),
                )
        return [rows[k] for k in sorted(rows)]

    async def reset(self, conversation_id: str) -> None:
        """Forget the conversation's Claude session: its next message starts a fresh one (files stay)."""
        worker = self._workers.get(conversation_id)
        if worker is not None:
            worker.fresh = True
            worker.retire("reset")
            return
        record = await self.store.get(conversation_id)
        if record is not None:
            await self.store.put(record.replace(session_id=None, turns=0))

    async def cancel(self, conversation_id: str) -> bool:
        """Stop the running turn, if any; queued messages still run."""
        worker = self._live(conversation_id)
        if worker is None or worker.current is None:
            return False
        await worker.interrupt()
        return True

    async def info(self, conversation_id: str) -> SessionInfo | None:
        worker = self._workers.get(conversation_id)
        if worker is not None:
            return worker.info()
        return next((s for s in await self.sessions() if s.conversation_id == conversation_id), None)

    def live_pids(self) -> list[int]:
        return [w.pid for w in self._admitted if w.pid is not None]
