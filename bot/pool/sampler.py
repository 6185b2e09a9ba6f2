"""Memory and liveness sampling: every live CLI tree's RSS, the memory kill, and CLIs that died from outside.

One snapshot of /proc per round (taken in a thread: it is the costly part). A turn whose tree
passes ``hard_ceiling_mb`` is killed; an idle one over ``session_max_rss_mb`` is retired. The loop
is a task boundary: one failing round is logged and the next one runs, so the memory kill never
stops silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import Counter
from collections.abc import Callable

import structlog

from bot import metrics, procs
from bot.config import PoolConfig
from bot.pool.worker import Worker, WorkerState

log = structlog.get_logger(__name__)

# Every sampler in this process: each reaps only orphans that no pool's CLI owns (tests run several pools).
_SAMPLERS: weakref.WeakSet[Sampler] = weakref.WeakSet()


class Sampler:
    def __init__(self, config: PoolConfig, admitted: set[Worker], workers: Callable[[], list[Worker]]) -> None:
        self.config = config
        self._admitted = admitted  # the room's set: the processes that hold room
        self._workers = workers  # every worker, admitted or not (queue depth, owned pids)
        self._rss_pids: set[str] = set()
        _SAMPLERS.add(self)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.rss_sample_s)
            try:
                # Reading /proc is the costly part (all processes, once), so it runs off the event loop.
                self.sample(await asyncio.to_thread(procs.Snapshot.take))
            except Exception:  # task boundary: the memory kill must outlive one bad sample
                log.exception("rss_sample_failed")

    def sample(self, snapshot: procs.Snapshot | None = None) -> None:
        """Every live CLI tree's RSS from one snapshot of /proc (taken here when none is given)."""
        snapshot = snapshot or procs.Snapshot.take()
        for worker in list(self._admitted):
            if worker.pid is not None and worker.state is not WorkerState.CLOSED:
                self._sample_worker(worker, snapshot)
        # Every pool's CLIs are asyncio's to reap, not only this one's (tests and benchmarks run several).
        own = {w.pid for sampler in _SAMPLERS for w in sampler._workers() if w.pid is not None}
        procs.reap_orphans(own, snapshot=snapshot)
        self._export_gauges()

    def forget(self, worker: Worker) -> None:
        """A pid's series goes with its process: pids are reused, and a dead one must not show memory."""
        pid = str(worker.pid)
        if pid in self._rss_pids:
            self._rss_pids.discard(pid)
            _remove_series(pid)

    def _export_gauges(self) -> None:
        live = [w for w in self._admitted if w.state is not WorkerState.CLOSED]
        metrics.LIVE_SESSIONS.set(len(live))
        metrics.POOL_RSS_BYTES.set(sum(w.rss_mb or 0.0 for w in live) * metrics.MIB)
        metrics.QUEUE_DEPTH.set(sum(len(w.queue) for w in self._workers()))
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

    def _sample_worker(self, worker: Worker, snapshot: procs.Snapshot) -> None:
        assert worker.pid is not None
        limits = self.config
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


def _remove_series(pid: str) -> None:
    with contextlib.suppress(KeyError):  # another pool in this process may have removed it (tests run several)
        metrics.PROCESS_RSS_BYTES.remove(pid)
