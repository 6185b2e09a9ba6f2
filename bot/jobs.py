"""Scheduled jobs: APScheduler 3.11 fires them, the store makes each occurrence run once across replicas.

A run is an ordinary inbound message (same pool, same per-conversation queue
as a user's message), on the job's profile.  Its result goes out through a
channel's ``Courier``; its outcome is kept in the store's run history.  After
``max_failures_before_pause`` failures in a row the job pauses itself and says
so at its target (or in the log).

An occurrence is written to the durable intake (``bot.core.Intake``) before it runs and settled when
its outcome is recorded, so one whose replica died or stopped mid-run runs again when that replica
starts (unless it is by then later than ``misfire_grace_s`` plus a turn's timeout).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job as ApsJob
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot import metrics
from bot.config import ScheduleConfig, Settings
from bot.core import Conversations, Courier, DeliveryError, Failure, Inbound, Intake, IntakeEntry, Store, StoreError
from bot.cron import trigger_for
from bot.store import keys

log = structlog.get_logger(__name__)

# Job occurrences in the durable intake (beside keyed API messages, "api:").
OCCURRENCE_PREFIX = "job:"
_TOO_LATE = "its replica stopped during the run, and it was too late to run again (misfire_grace_s)"

Fire = Callable[[str, datetime], Coroutine[Any, Any, None]]


class JobError(Exception):
    """An unknown job id, or a request the job cannot take; the message says which."""


class JobStatus(enum.StrEnum):
    """How one occurrence ended (the stored ``status``, the metric's label and the API's value)."""

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # overlap "skip": the previous run was still busy
    CANCELLED = "cancelled"  # cut short by a restart, never counted towards a pause


@dataclass(frozen=True)
class JobRun:
    """One occurrence of a job, as kept in its history."""

    job_id: str
    fire_time: str
    started_at: float
    ended_at: float | None = None
    status: JobStatus = JobStatus.RUNNING
    cost_usd: float = 0.0
    delivered_to: str = ""
    conversation_id: str = ""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> JobRun:
        return cls(**{**entry, "status": JobStatus(entry["status"])})


@dataclass(frozen=True)
class JobInfo:
    """One row of ``agentd jobs`` and ``GET /v1/jobs``."""

    id: str
    schedule: str
    timezone: str
    next_fire_time: str | None
    last_status: JobStatus | None
    paused: bool
    deliver_to: str
    profile: str


class _FiringExecutor(BaseExecutor):  # type: ignore[misc]  # untyped library base
    """Hands each due occurrence, with its scheduled time, to ``fire``; APScheduler's own executors drop it."""

    def __init__(self, fire: Fire) -> None:
        super().__init__()
        self._fire = fire
        self.running: set[asyncio.Task[None]] = set()

    def _do_submit_job(self, job: ApsJob, run_times: list[datetime]) -> None:
        # Coalesced: only the newest missed time runs (a daemon down for a day does not replay the day).
        task = asyncio.get_running_loop().create_task(self._fire(job.id, run_times[-1]))
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        task.add_done_callback(lambda _: self._run_job_success(job.id, []))


# -- the scheduler ---------------------------------------------------------------------------


class Scheduler:
    """Owns the APScheduler instance, the run claims, pauses and history."""

    name = "schedule"

    def __init__(self, settings: Settings, conversations: Conversations, store: Store, intake: Intake) -> None:
        self._jobs = {job.id: job for job in settings.schedule}
        self._conversations, self._store, self._intake = conversations, store, intake
        self._replays: set[asyncio.Task[None]] = set()
        self._couriers: dict[str, Courier] = {}
        self._executor = _FiringExecutor(self._fire)
        self._aps = AsyncIOScheduler(timezone=UTC, executors={"default": self._executor})
        self._locks: dict[str, asyncio.Lock] = {job_id: asyncio.Lock() for job_id in self._jobs}
        self._turn_timeout_s = settings.agent.turn_timeout_s

    def add_courier(self, kind: str, courier: Courier) -> None:
        """``slack`` or ``email``: where ``deliver_to`` targets of that kind go."""
        self._couriers[kind] = courier

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        for job in self._jobs.values():
            self._aps.add_job(
                self._noop,
                trigger_for(job.cron, job.every, job.timezone),
                id=job.id,
                misfire_grace_time=int(job.misfire_grace_s),
                coalesce=True,
                max_instances=1000,  # overlap is ours to decide (skip or queue), across replicas
            )
            if await self._paused_at_start(job.id):
                self._aps.pause_job(job.id)
        self._aps.start()
        self._update_gauges()
        log.info("schedule_started", jobs=sorted(self._jobs))
        await self._replay()

    async def stop_intake(self) -> None:
        if self._aps.running:
            self._aps.shutdown(wait=False)

    async def close(self) -> None:
        await self.stop_intake()
        running = {*self._executor.running, *self._replays}
        if running:
            await asyncio.wait(running)

    async def _paused_at_start(self, job_id: str) -> bool:
        try:
            return await self._paused(job_id)
        except StoreError as exc:
            # Each occurrence checks again before it runs; start anyway.
            log.error("store_error", job=job_id, error=str(exc), note="pause state unknown at start")
            return False

    @staticmethod
    async def _noop() -> None:  # never called: the executor runs ``_fire`` instead
        return None

    # -- control ------------------------------------------------------------------------------

    def job(self, job_id: str) -> ScheduleConfig:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise JobError(f"no job named {job_id!r}") from None

    async def run_now(self, job_id: str) -> JobRun:
        """Run one occurrence now (manual), whatever the schedule; returns when it has finished."""
        self.job(job_id)
        return await self._occurrence(job_id, datetime.now(UTC), manual=True)

    async def pause(self, job_id: str) -> None:
        self.job(job_id)
        await self._store.put_value(keys.job_paused(job_id), "1", keys.JOB_STATE_TTL_S)
        if self._aps.running:
            self._aps.pause_job(job_id)
        self._update_gauges()
        log.info("job_paused", job=job_id)

    async def resume(self, job_id: str) -> None:
        self.job(job_id)
        await self._store.delete_value(keys.job_paused(job_id))
        await self._store.delete_value(keys.job_failures(job_id))
        if self._aps.running:
            self._aps.resume_job(job_id)
        self._update_gauges()
        log.info("job_resumed", job=job_id)

    async def jobs(self) -> list[JobInfo]:
        return [await self._info(job) for job in self._jobs.values()]

    async def history(self, job_id: str) -> list[JobRun]:
        self.job(job_id)
        raw = await self._store.get_value(keys.job_runs(job_id))
        return [JobRun.from_json(entry) for entry in json.loads(raw)] if raw else []

    async def _info(self, job: ScheduleConfig) -> JobInfo:
        aps = self._aps.get_job(job.id) if self._aps.running else None
        runs = await self.history(job.id)
        next_time = getattr(aps, "next_run_time", None)
        return JobInfo(
            id=job.id,
            schedule=job.cron or f"every {job.every:g}s",
            timezone=job.timezone,
            next_fire_time=next_time.isoformat() if next_time else None,
            # A skipped tick did no work: the last status is that of the last run that did.
            last_status=next((run.status for run in runs if run.status is not JobStatus.SKIPPED), None),
            paused=await self._paused(job.id),
            deliver_to=job.deliver_to,
            profile=job.profile,
        )

    # -- one occurrence -------------------------------------------------------------------------

    async def _fire(self, job_id: str, fire_time: datetime) -> None:
        """A scheduled occurrence: run it here unless another replica claimed it or the job is paused."""
        try:
            if await self._paused(job_id):
                return
            claim = keys.job_fire(job_id, fire_time.astimezone(UTC).isoformat())
            if not await self._store.claim(claim, keys.JOB_FIRE_TTL_S):
                log.info("job_claimed_elsewhere", job=job_id, fire_time=fire_time.isoformat())
                return
            key = await self._accept(job_id, fire_time)
            await self._settle(key, await self._occurrence(job_id, fire_time, manual=False))
        except StoreError as exc:
            log.error("store_error", job=job_id, error=str(exc), note="occurrence not run")
        except Exception:  # task boundary: one bad run must not stop the scheduler
            log.exception("job_failed_internally", job=job_id)
        finally:
            self._update_gauges()

    async def _occurrence(self, job_id: str, fire_time: datetime, manual: bool, replay: bool = False) -> JobRun:
        """One run, unless overlap "skip" finds the previous one busy. A replay is that same occurrence
        again: the busy mark its interrupted run left must not skip it."""
        job = self._jobs[job_id]
        run = JobRun(job_id, fire_time.isoformat(), time.time(), delivered_to=job.deliver_to)
        marked = job.overlap == "skip" and not replay
        if marked and not await self._store.claim(keys.job_running(job_id), self._running_ttl_s):
            return await self._record(
                dataclasses.replace(
                    run, status=JobStatus.SKIPPED, ended_at=time.time(), error="the previous run is still busy"
                )
            )
        try:
            async with self._locks[job_id]:
                return await self._run(job, run, manual)
        finally:
            if marked:
                await self._store.delete_value(keys.job_running(job_id))

    # -- durable occurrences: accepted before they run, run again after a crash ----------------------

    async def _accept(self, job_id: str, fire_time: datetime) -> str:
        """Written to the durable intake before the run: a replica killed mid-run runs it at its next start."""
        fire = fire_time.astimezone(UTC).isoformat()
        key = f"{OCCURRENCE_PREFIX}{job_id}:{fire}"
        payload = json.dumps({"job": job_id, "fire_time": fire_time.isoformat()})
        await self._intake.accept(IntakeEntry(key, f"job:{job_id}", payload, time.time()))
        return key

    async def _settle(self, key: str, run: JobRun) -> None:
        """Its outcome recorded; a run cut short by a restart (cancelled) stays accepted, to run again."""
        if run.status is not JobStatus.CANCELLED:
            await self._intake.record(key, json.dumps({"status": run.status}))

    async def _replay(self) -> None:
        """At start: every occurrence this replica accepted and never finished runs again, in the background."""
        for entry in await self._intake.unfinished():
            if entry.key.startswith(OCCURRENCE_PREFIX):
                task = asyncio.create_task(self._replayed(entry), name=f"replay {entry.key}")
                self._replays.add(task)
                task.add_done_callback(self._replays.discard)

    async def _replayed(self, entry: IntakeEntry) -> None:
        """A task boundary: the occurrence runs again, or its outcome says why not."""
        job_id = entry.key.removeprefix(OCCURRENCE_PREFIX).partition(":")[0]
        try:
            fire_time = _fire_time_of(entry)
            why_not = await self._why_not_again(job_id, fire_time)
            if fire_time is None or why_not is not None:
                log.warning("job_not_replayed", job=job_id, key=entry.key, reason=why_not)
                await self._intake.record(entry.key, json.dumps({"status": "not replayed", "reason": why_not}))
                return
            log.info("job_replayed", job=job_id, fire_time=fire_time.isoformat())
            await self._settle(entry.key, await self._occurrence(job_id, fire_time, manual=False, replay=True))
        except StoreError as exc:
            log.error("store_error", job=job_id, error=str(exc), note="occurrence not run again")
        except Exception:  # task boundary: one bad replay must not stop the others
            log.exception("job_failed_internally", job=job_id)

    async def _why_not_again(self, job_id: str, fire_time: datetime | None) -> str | None:
        """None when an interrupted occurrence should run again; else why not (recorded, so it is not retried)."""
        if fire_time is None:
            return "its stored entry is unreadable"
        job = self._jobs.get(job_id)
        if job is None:
            return "the job is no longer in the config"
        if await self._paused(job_id):
            return "the job is paused"
        late_s = time.time() - fire_time.timestamp()
        if late_s > job.misfire_grace_s + self._turn_timeout_s:
            await self._record(
                JobRun(job_id, fire_time.isoformat(), time.time(), time.time(), JobStatus.CANCELLED, error=_TOO_LATE)
            )
            return "too late to run again (misfire_grace_s)"
        return None

    @property
    def _running_ttl_s(self) -> int:
        # A crashed replica's "running" mark must not block the job for good.
        return int(self._turn_timeout_s) + 120

    async def _run(self, job: ScheduleConfig, run: JobRun, manual: bool) -> JobRun:
        conversation = self._conversation(job)
        run = dataclasses.replace(run, conversation_id=conversation)
        log.info("job_run_start", job=job.id, fire_time=run.fire_time, conversation=conversation, manual=manual)
        outcome = await self._conversations.ask(
            Inbound(conversation, job.prompt, source="job", profile=job.profile, waits=True, user=f"job:{job.id}")
        )
        run = dataclasses.replace(run, cost_usd=outcome.cost_usd)
        if outcome.failure is Failure.SHUTDOWN:
            # Cut short by a restart, not the job's fault: recorded, never counted towards a pause.
            return await self._record(dataclasses.replace(run, ended_at=time.time(), status=JobStatus.CANCELLED))
        error = None if outcome.ok else outcome.error or str(outcome.failure)
        if error is None:
            error = await self._deliver(job, f"{job.id}: scheduled run", outcome.reply)
        finished = dataclasses.replace(
            run, ended_at=time.time(), status=JobStatus.OK if error is None else JobStatus.FAILED, error=error
        )
        await self._record(finished)
        await self._count(job, finished)
        return finished

    def _conversation(self, job: ScheduleConfig) -> str:
        if job.conversation == "new":
            return f"job:{job.id}:{uuid.uuid4().hex[:12]}"
        return job.conversation

    async def _deliver(self, job: ScheduleConfig, subject: str, text: str) -> str | None:
        """None when delivered (or there is no target); else why it failed."""
        if not job.deliver_to:
            return None
        kind, _, target = job.deliver_to.partition(":")
        courier = self._couriers.get(kind)
        if courier is None:
            return f"the {kind} channel is not running, so {job.deliver_to} cannot be reached"
        try:
            await courier.deliver(target, subject, text or "(The run finished without a written answer.)")
        except DeliveryError as exc:
            return f"delivery to {job.deliver_to} failed: {exc}"
        return None

    async def _count(self, job: ScheduleConfig, run: JobRun) -> None:
        """Consecutive failures; at the limit the job pauses and says why."""
        metrics.JOB_RUNS.labels(job=job.id, status=run.status).inc()
        if run.status is JobStatus.OK:
            await self._store.delete_value(keys.job_failures(job.id))
            return
        failures = await self._store.incr(keys.job_failures(job.id), keys.JOB_STATE_TTL_S)
        log.warning("job_run_failed", job=job.id, error=run.error, consecutive=failures)
        if failures >= job.max_failures_before_pause:
            await self.pause(job.id)
            await self._alert(job, failures, run.error or "unknown error")

    async def _alert(self, job: ScheduleConfig, failures: int, error: str) -> None:
        text = (
            f"The scheduled job {job.id!r} failed {failures} times in a row and is paused. "
            f"Last error: {error}. Resume it with `agentd jobs resume {job.id}`."
        )
        log.error("job_paused_after_failures", job=job.id, failures=failures, error=error)
        problem = await self._deliver(job, f"{job.id}: paused after {failures} failures", text)
        if problem is not None:
            log.error("job_alert_not_delivered", job=job.id, error=problem)

    async def _record(self, run: JobRun) -> JobRun:
        job = self._jobs[run.job_id]
        runs = [run, *await self.history(run.job_id)][: job.keep_runs]
        value = json.dumps([r.to_json() for r in runs])
        await self._store.put_value(keys.job_runs(run.job_id), value, keys.JOB_STATE_TTL_S)
        log.info("job_run_end", job=run.job_id, status=run.status, error=run.error, cost_usd=round(run.cost_usd, 6))
        return run

    async def _paused(self, job_id: str) -> bool:
        return await self._store.get_value(keys.job_paused(job_id)) is not None

    def _update_gauges(self) -> None:
        if not self._aps.running:
            return
        for job_id in self._jobs:
            aps = self._aps.get_job(job_id)
            next_time = getattr(aps, "next_run_time", None)
            metrics.JOB_NEXT_FIRE.labels(job=job_id).set(next_time.timestamp() if next_time else 0)


def _fire_time_of(entry: IntakeEntry) -> datetime | None:
    """The scheduled time an accepted occurrence was for; None if its entry cannot be read."""
    try:
        accepted = json.loads(entry.payload)
        return datetime.fromisoformat(accepted["fire_time"])
    except (ValueError, KeyError, TypeError):
        return None
