"""What the pool shows of itself: a row per process for ``/status`` and ``agentd sessions``, and its totals."""

from __future__ import annotations

import time
from collections.abc import Iterable

from bot.config import PoolConfig
from bot.core import ConversationRecord, SessionInfo
from bot.pool.worker import Worker, WorkerState
from bot.status import PoolStatus, PoolTotals, RecentEvents, SessionStatus


def pool_status(
    shown: Iterable[Worker],
    admitted: Iterable[Worker],
    every: Iterable[Worker],
    limits: PoolConfig,
    events: RecentEvents,
) -> PoolStatus:
    """A row per ``shown`` worker, the totals of the ``admitted`` against ``limits``, the queues of ``every`` one."""
    live = [w for w in admitted if w.state is not WorkerState.CLOSED]
    totals = PoolTotals(
        sessions=sum(1 for w in live if not w.spare),
        max_sessions=limits.max_sessions,
        spares=sum(1 for w in live if w.spare),
        rss_mb=round(sum(w.rss_mb or 0.0 for w in live), 1),
        memory_budget_mb=limits.memory_budget_mb,
        queued=sum(len(w.queue) for w in every),
    )
    rows = sorted(shown, key=lambda w: w.record.conversation_id)
    return PoolStatus(tuple(session_status(w) for w in rows), totals, events.items())


def session_status(worker: Worker) -> SessionStatus:
    return SessionStatus(
        conversation_id=worker.record.conversation_id,
        profile=worker.profile.name,
        state=worker.shown_state,
        pid=worker.pid,
        rss_mb=_rounded(worker.rss_mb),
        rss_history_mb=tuple(worker.rss_history),
        turns=worker.record.turns,
        idle_s=round(time.monotonic() - worker.last_used, 1),
        queued=len(worker.queue),
    )


def session_info(worker: Worker) -> SessionInfo:
    return SessionInfo(
        conversation_id=worker.record.conversation_id,
        session_id=worker.record.session_id,
        state=worker.shown_state,
        pid=worker.pid,
        rss_mb=_rounded(worker.rss_mb),
        turns=worker.record.turns,
        idle_s=round(time.monotonic() - worker.last_used, 1),
        cost_usd=round(worker.record.cost_usd, 6),
    )


def sessions(live: Iterable[Worker], records: Iterable[ConversationRecord]) -> list[SessionInfo]:
    """Every conversation by id: the live ones as they run, the stored rest as evicted."""
    rows = {w.record.conversation_id: session_info(w) for w in live}
    for record in records:
        rows.setdefault(record.conversation_id, evicted_info(record))
    return [rows[k] for k in sorted(rows)]


def evicted_info(record: ConversationRecord) -> SessionInfo:
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


def _rounded(rss_mb: float | None) -> float | None:
    return None if rss_mb is None else round(rss_mb, 1)
