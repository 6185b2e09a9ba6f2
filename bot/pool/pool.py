"""Intake and routing: which worker serves each message, when a conversation starts, and what happens at its exit."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from bot import eviction, fairness, metrics, procs
from bot.config import Settings
from bot.core import (
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
    TranscriptSource,
)
from bot.pool import report
from bot.pool.room import Room
from bot.pool.sampler import Sampler
from bot.pool.spares import Spares, new_record
from bot.pool.turn import Turn
from bot.pool.worker import Worker, WorkerState
from bot.security import safe_name
from bot.status import PoolStatus, RecentEvents
from bot.telemetry import DISABLED, Telemetry

log = structlog.get_logger(__name__)


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
        self.spares = Spares(self)
        self._spares = self.spares.workers  # in start order
        # How often each conversation is used lately: eviction keeps the busy ones warm (bot/eviction.py).
        self._frequency = eviction.Frequency(window=10 * settings.pool.max_sessions)
        self.room = Room(settings.pool, self._spares, self._frequency)
        self._admitted = self.room.admitted  # the processes holding room, until each has exited
        self._waiting = self.room.waiting
        self._sampler = Sampler(settings.pool, self._admitted, self._all_workers)
        self._stopping = False
        self._background: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None
        self.events = RecentEvents()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        # A CLI killed from outside leaves its sandbox helper behind; as subreaper we inherit and reap it.
        if not procs.become_subreaper():
            log.warning("subreaper_unavailable")
        # What a crashed daemon of this data dir left behind (processes a parent-death signal missed).
        leftovers = await asyncio.to_thread(procs.sweep_leftovers, self.data_dir)
        if leftovers:
            log.warning("leftovers_reaped", processes=[f"{pid} {name}" for pid, name in leftovers])
        self._monitor = asyncio.create_task(self._sampler.run_forever(), name="pool:rss")
        self.spares.fill()

    async def close(self, grace_s: float) -> None:
        """Stop intake, let queued turns finish within ``grace_s``, then cancel the rest."""
        self._stopping = self.room.closing = True
        self.spares.pace()  # stopped, a spare would not even act on SIGTERM
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
        for helper in (self._monitor, self.spares.timer):
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
                if self.room.over_user_cap(tenant, self._workers.values()):
                    log.warning("admission_user_limit", conversation=inbound.conversation_id, tenant=tenant)
                    turn.fail(Failure.USER_LIMIT)
                    return turn
                worker = self._start_conversation(inbound.conversation_id, record, profile)
                worker.tenant = tenant
        self._route(worker, turn)
        return turn

    async def ask(self, inbound: Inbound) -> Outcome:
        turn = await self.submit(inbound)
        return await turn.outcome

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
            spare = self.spares.take(profile)
            if spare is not None:
                return self._adopt(spare, conversation_id)
            record = new_record(self.data_dir, conversation_id, safe_name(conversation_id), profile.name)
            worker = Worker(self, record, resume=False, spare=False, profile=profile)
        else:
            resumable = record.session_id is not None and record.turns > 0
            if not resumable:
                record = record.replace(session_id=str(uuid.uuid4()))
            worker = Worker(self, record, resume=resumable, spare=False, profile=profile)
        self._workers[conversation_id] = worker
        return worker

    def _adopt(self, spare: Worker, conversation_id: str) -> Worker:
        workdir_name = Path(spare.record.workdir).name
        record = new_record(self.data_dir, conversation_id, workdir_name, spare.profile.name, spare.record.session_id)
        spare.adopt(record)
        self.spares.pace()  # a stopped spare goes on at once: this conversation waits for it
        self._workers[conversation_id] = spare
        spare.log.info("adopt_spare", workdir=workdir_name)
        self._spawn_background(self.persist(record))
        # The replacement spare is started after this conversation's first reply: a CLI start-up
        # takes a core for most of a second, and would slow exactly the reply the spare is for.
        spare.refill_spares = True
        return spare

    async def restore_transcript(self, spec: SessionSpec) -> bool:
        if self.transcripts is None:
            return False
        try:
            return await self.transcripts.restore(spec)
        except StoreError as exc:  # Redis down: the conversation goes on afresh rather than not at all
            log.warning("transcript_restore_failed", conversation=spec.conversation_id, error=str(exc))
            return False

    # -- room --------------------------------------------------------------------

    async def admit(self, worker: Worker) -> bool:
        return await self.room.admit(worker)

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def notify_room(self) -> None:
        await self.room.notify()

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
        self.spares.exited(worker)
        self._sampler.forget(worker)
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
            self.spares.fill()

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
        if successor is None or successor.state is WorkerState.CLOSED:
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

    def sample(self, snapshot: procs.Snapshot | None = None) -> None:
        """Every live CLI tree's RSS, now (the sampler does this every ``rss_sample_s``)."""
        self._sampler.sample(snapshot)

    # -- introspection -------------------------------------------------------------

    def status(self) -> PoolStatus:
        """Live conversation processes (retiring ones too), the totals against their limits, recent events."""
        shown = {*self._workers.values(), *self._retiring.values()}
        return report.pool_status(shown, self._admitted, self._all_workers(), self.settings.pool, self.events)

    async def sessions(self) -> list[SessionInfo]:
        live = list(self._workers.values())
        try:
            records = await self.store.records()
        except StoreError as exc:
            log.error("store_error", error=str(exc))
            records = []
        return report.sessions(live, records)

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
            return report.session_info(worker)
        return next((s for s in await self.sessions() if s.conversation_id == conversation_id), None)

    def live_pids(self) -> list[int]:
        return [w.pid for w in self._admitted if w.pid is not None]
