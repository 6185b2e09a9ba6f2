"""What ``/status`` shows: small frozen snapshots that each component (pool, channels, scheduler) fills in."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.core import ChannelStatus

if TYPE_CHECKING:  # only a type here: the pool imports this module and needs no scheduler
    from bot.jobs import JobInfo

# RSS samples kept per CLI process for the memory chart (at the default 2 s sampling, two minutes).
RSS_HISTORY_SAMPLES = 60
# Evictions, crashes and budget stops kept for the page, newest last.
RECENT_EVENTS = 50


@dataclass(frozen=True)
class SessionStatus:
    """One live conversation process."""

    conversation_id: str
    profile: str
    state: str
    pid: int | None
    rss_mb: float | None
    rss_history_mb: tuple[float, ...]
    turns: int
    idle_s: float
    queued: int
    cost_today_usd: float | None = None  # filled in from the ledger; None when the store cannot say


@dataclass(frozen=True)
class PoolEvent:
    """An eviction, a crash or a budget stop, for the page's recent-events list."""

    at: float  # Unix seconds
    kind: str  # evict | crash | budget_stop
    conversation_id: str
    detail: str


@dataclass(frozen=True)
class PoolTotals:
    sessions: int
    max_sessions: int
    spares: int
    rss_mb: float
    memory_budget_mb: int
    queued: int


@dataclass(frozen=True)
class PoolStatus:
    sessions: tuple[SessionStatus, ...]
    totals: PoolTotals
    events: tuple[PoolEvent, ...]


@dataclass(frozen=True)
class MirrorStatus:
    """The Redis transcript mirror: batches it failed to store since start, and the last such error."""

    mirror_errors: int
    last_error: str | None


@dataclass(frozen=True)
class StatusSnapshot:
    at: float
    pool: PoolStatus
    channels: tuple[ChannelStatus, ...]
    jobs: tuple[JobInfo, ...]
    problems: tuple[str, ...] = ()  # what could not be read this time (the store down, say)
    mirror: MirrorStatus | None = None  # None: no mirror (the embedded store keeps transcripts on disk)


class RecentEvents:
    """A bounded ring of recent pool events: old ones fall off, so it never grows."""

    def __init__(self, size: int = RECENT_EVENTS) -> None:
        self._events: deque[PoolEvent] = deque(maxlen=size)

    def add(self, kind: str, conversation_id: str, detail: str) -> None:
        self._events.append(PoolEvent(time.time(), kind, conversation_id, detail))

    def items(self) -> tuple[PoolEvent, ...]:
        return tuple(self._events)
