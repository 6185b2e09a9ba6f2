"""Intake, routing and spares: which worker serves each message, and the processes kept ready for new ones."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
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
from bot.pool.room import Room
from bot.pool.sampler import Sampler
from bot.pool.turn import Turn
from bot.pool.worker import Worker, WorkerState
from bot.security import safe_name
from bot.status import PoolStatus, PoolTotals, RecentEvents
from bot.telemetry import DISABLED, Telemetry

log = structlog.get_logger(__name__)


# A spare still starting may be adopted: its conversation waits for it rather than for a new CLI.
_ADOPTABLE = (WorkerState.STARTING, WorkerState.WARM)


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
    """CLI processes started ahead of demand, per profile: a new conversation adopts one instead of a spawn."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.workers: list[Worker] = []
        self.backoff = SpareBackoff()
        self.timer: asyncio.Task[None] | None = None

    def fill(self) -> None:
        wait_s = self.backoff.wait_s()
        if wait_s > 0:
            if self.timer is None or self.timer.done():
                self.timer = asyncio.create_task(self._fill_after(wait_s), name="pool:spares")
            return
        pool = self._pool
        for profile_name, wanted in pool.settings.pool.prewarm_by_profile.items():
            profile = pool.profile(profile_name)
            while not pool.stopping and self._count(profile) < wanted and pool.room.spare_fits():
                name = f"spare-{uuid.uuid4().hex[:12]}"
                record = new_record(pool.data_dir, f"spare:{name}", name, profile.name)
                self.workers.append(Worker(pool, record, resume=False, spare=True, profile=profile))

    def take(self, profile: Profile) -> Worker | None:
        if self._pool.room.conversations() >= self._pool.settings.pool.max_sessions:
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
        self.fill_spares()

    async def close(self, grace_s: float) -> None:
        """Stop intake, let queued turns finish within ``grace_s``, then cancel the rest."""
        self._stopping = self.room.closing = True
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

    def fill_spares(self) -> None:
        self.spares.fill()

    def spare_started(self) -> None:
        self.spares.backoff.succeeded()

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
        workers = sorted({*self._workers.values(), *self._retiring.values()}, key=lambda w: w.record.conversation_id)
        limits = self.settings.pool
        live = [w for w in self._admitted if w.state is not WorkerState.CLOSED]
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
            rows.setdefault(record.conversation_id, _evicted_info(record))
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


def _evicted_info(record: ConversationRecord) -> SessionInfo:
    return SessionInfo(
        conversation_id=record.conversation_id,
        session_id=record.session_id,
        state="evicted",
        pid=None,
        rss_mb=None,
        turns=record.turns,
        idle_s=None,
        cost_usd=round(record.cost_usd, 6),
    )
