"""Room: which processes hold it, who waits for it, and which idle process gives it up.

The decisions (does one more fit, who is the victim, in which order) are pure functions over
frozen snapshots (``Occupant``, ``Limits``), testable in milliseconds. ``Room`` applies them to
live workers: a process holds its room from admission until it has exited, retiring or not, and
conversations wait for room in a bounded queue where the fairest waiter goes first.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bot import eviction, fairness, metrics
from bot.config import PoolConfig
from bot.core import Failure
from bot.pool.worker import Worker


@dataclass(frozen=True)
class Limits:
    max_sessions: int
    max_processes: int  # conversations and spares together
    memory_budget_mb: float
    spawn_estimate_mb: float  # what a process not yet measured is counted as
    lfu: bool  # eviction weighs how often a conversation is used, not only how recently

    @classmethod
    def of(cls, config: PoolConfig) -> Limits:
        return cls(
            max_sessions=config.max_sessions,
            max_processes=config.max_sessions + config.spares_total,
            memory_budget_mb=config.memory_budget_mb,
            spawn_estimate_mb=config.spawn_estimate_mb,
            lfu=config.eviction == "lfu",
        )


@dataclass(frozen=True, eq=False)  # compared by identity: two processes may look alike
class Occupant:
    """What room decisions read of one admitted process."""

    conversation_id: str
    spare: bool = False
    rss_mb: float | None = None
    idle: bool = False
    retiring: bool = False
    last_used: float = 0.0


def memory_used(occupants: Iterable[Occupant], limits: Limits) -> float:
    return sum(o.rss_mb or limits.spawn_estimate_mb for o in occupants)


def memory_fits(admitted: Sequence[Occupant], limits: Limits) -> bool:
    return memory_used(admitted, limits) + limits.spawn_estimate_mb <= limits.memory_budget_mb


def conversation_fits(admitted: Sequence[Occupant], limits: Limits) -> bool:
    """Whether one more conversation's process fits beside ``admitted`` (retiring ones still count)."""
    conversations = sum(1 for o in admitted if not o.spare)
    return (
        conversations < limits.max_sessions and len(admitted) < limits.max_processes and memory_fits(admitted, limits)
    )


def spare_fits(admitted: Sequence[Occupant], pending_spares: int, limits: Limits) -> bool:
    """Whether one more spare fits, counting the spares started but not yet admitted."""
    return len(admitted) + pending_spares < limits.max_processes and memory_fits(admitted, limits)


def eviction_order(occupant: Occupant, uses: int) -> tuple[bool, int, float]:
    """Spares first; then the least used lately (0 for all under ``lru``); then the least recent."""
    return (not occupant.spare, uses, occupant.last_used)


def victim(admitted: Sequence[Occupant], limits: Limits, uses: Callable[[str], int]) -> Occupant | None:
    """The next idle process to retire for room, or None when the retiring ones already cover it."""
    staying = [o for o in admitted if not o.retiring]
    sessions_short = sum(1 for o in staying if not o.spare) >= limits.max_sessions
    processes_short = len(staying) >= limits.max_processes
    memory_short = memory_used(staying, limits) + limits.spawn_estimate_mb > limits.memory_budget_mb
    idle = [o for o in staying if o.idle]
    if sessions_short:
        # Retiring a spare frees no conversation slot.
        idle = [o for o in idle if not o.spare]
    elif not (processes_short or memory_short):
        return None
    return min(idle, key=lambda o: eviction_order(o, uses(o.conversation_id) if limits.lfu else 0), default=None)


def occupant(worker: Worker) -> Occupant:
    return Occupant(
        conversation_id=worker.record.conversation_id,
        spare=worker.spare,
        rss_mb=worker.rss_mb,
        idle=worker.idle,
        retiring=worker.retire_reason is not None,
        last_used=worker.last_used,
    )


class Room:
    """Admission of workers under the pool's limits, fairly, evicting idle ones when a waiter needs room."""

    def __init__(self, config: PoolConfig, spares: list[Worker], frequency: eviction.Frequency) -> None:
        self.config, self.limits = config, Limits.of(config)
        self.admitted: set[Worker] = set()
        # Conversations waiting for room, in arrival order; the fair one among them goes first.
        self.waiting: dict[Worker, fairness.Waiter] = {}
        self.closing = False
        self._spares = spares  # the pool's list: spares started but not yet admitted still take room
        self._frequency = frequency
        self._arrivals = itertools.count()
        self._changed = asyncio.Condition()

    async def admit(self, worker: Worker) -> bool:
        """Wait until ``worker`` fits under max_sessions and the memory budget, and it is its turn.

        Eviction retires only as many idle processes as the room still missing after the retiring
        ones. Conversations wait at most ``admission_timeout_s``, and free room goes to the fairest
        waiter (``bot.fairness``); one refused here has its messages answered "busy".
        """
        async with self._changed:
            if worker.spare or (self._fits(worker) and not self.waiting):
                return self._admit_now(worker)
            if self.closing:
                return False
            if len(self.waiting) >= self.config.admission_queue_limit:
                return self._refuse(worker, "queue_full")
            self.waiting[worker] = fairness.Waiter(worker.tenant, next(self._arrivals))
            try:
                return await self._wait_for_room(worker)
            finally:
                del self.waiting[worker]
                self._changed.notify_all()  # the next waiter may be the fair one now

    async def notify(self) -> None:
        """Room may have changed (a process exited or went idle): waiters look again."""
        async with self._changed:
            self._changed.notify_all()

    def over_user_cap(self, tenant: str | None, conversations: Iterable[Worker]) -> bool:
        """One more busy conversation for ``tenant`` passes its cap (per Slack user, or per mail domain)."""
        cap = self.config.max_busy_per_domain if fairness.is_domain(tenant) else self.config.max_busy_per_user
        busy = (w.tenant for w in conversations if w.retire_reason is None and w.busy)
        if not fairness.over_cap(tenant, busy, cap):
            return False
        metrics.ADMISSION_REFUSED.labels(reason="user_limit").inc()
        return True

    def conversations(self) -> int:
        return sum(1 for w in self.admitted if not w.spare)

    def spare_fits(self, exclude: Worker | None = None) -> bool:
        pending = sum(1 for s in self._spares if not s.admitted and s is not exclude)
        return spare_fits(self._occupants(), pending, self.limits)

    async def _wait_for_room(self, worker: Worker) -> bool:
        deadline = time.monotonic() + self.config.admission_timeout_s
        while not (self._is_next(worker) and self._fits(worker)):
            if self.closing:
                return False
            retiring = self._victim() if self._is_next(worker) else None
            if retiring is not None:
                retiring.retire("room")
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                return self._refuse(worker, "timeout")
        return self._admit_now(worker)

    def _is_next(self, worker: Worker) -> bool:
        tenants = (w.tenant for w in self.admitted if not w.spare)
        return fairness.next_waiter(list(self.waiting.values()), tenants) == self.waiting[worker]

    def _admit_now(self, worker: Worker) -> bool:
        if not self._fits(worker):
            return False  # only a spare gets here without room: it is simply not started
        worker.admitted = True
        self.admitted.add(worker)
        return True

    def _refuse(self, worker: Worker, reason: str) -> bool:
        worker.log.warning("admission_refused", reason=reason, tenant=worker.tenant)
        metrics.ADMISSION_REFUSED.labels(reason=reason).inc()
        worker.retire("busy")
        worker.fail_queued(Failure.POOL_BUSY)
        return False

    def _fits(self, worker: Worker) -> bool:
        if worker.spare:
            return self.spare_fits(exclude=worker)
        return conversation_fits(self._occupants(), self.limits)

    def _victim(self) -> Worker | None:
        by_occupant = {occupant(w): w for w in self.admitted}
        chosen = victim(list(by_occupant), self.limits, self._frequency.count)
        return None if chosen is None else by_occupant[chosen]

    def _occupants(self) -> list[Occupant]:
        return [occupant(w) for w in self.admitted]
