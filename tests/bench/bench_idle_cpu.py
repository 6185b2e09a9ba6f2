"""The daemon's own CPU with many idle warm sessions: what the pool's bookkeeping costs at rest.

Run: .venv/bin/python -m tests.bench.bench_idle_cpu [--sessions 50] [--seconds 30]

N conversations are made warm (one real CLI each, through the gateway, on the fake model), then the
process's CPU time (every thread, so the sampler's too) is measured over a window with nothing to do
but the RSS sampler every ``pool.rss_sample_s``. Beside it, one RSS sample of all N trees is timed
both ways, in the same run: from one snapshot of /proc, and tree by tree as before (a full scan of
/proc per tree, twice). Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bot import logs, procs
from bot.config import LogConfig
from bot.core import Inbound
from tests.bench.bench_pool import close_gateways, make_pool
from tests.fakes.model_process import ModelProcess


def per_tree_sample(pids: list[int]) -> None:
    """The sampler before the snapshot: each tree's RSS and members read by scans of its own."""
    for pid in pids:
        procs.tree_rss_mb(pid)
        procs.ProcessTree().remember(pid)


def snapshot_sample(pids: list[int]) -> None:
    snapshot = procs.Snapshot.take()
    for pid in pids:
        snapshot.tree_rss_mb(pid)
        procs.ProcessTree().remember(pid, snapshot)


def median_ms(action: Callable[[list[int]], None], pids: list[int], runs: int = 7) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action(pids)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


async def main(sessions: int, seconds: float) -> None:
    logs.configure(LogConfig(level="warning"))
    model = ModelProcess.start()
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-idle-"))
    pool = await make_pool(
        model, root, max_sessions=sessions, memory_budget_mb=sessions * 400, spawn_estimate_mb=200, idle_timeout_s=3600
    )
    # A few at a time: 50 CLIs starting at once on 2 cores miss the SDK's initialize deadline.
    for first in range(0, sessions, 2):
        batch = range(first, min(first + 2, sessions))
        await asyncio.gather(*(pool.ask(Inbound(f"api:idle{i}", "warm up")) for i in batch))
    pids = pool.live_pids()
    await asyncio.sleep(5)  # let the CLIs finish their own start-up work
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
    sample_s = pool.settings.pool.rss_sample_s
    print(
        f"Idle daemon with {len(pids)} warm sessions: {cpu / wall * 100:.2f} % of one core over {wall:.0f} s"
        f" (RSS sampled every {sample_s:g} s, off the event loop; goal < 2 %)"
    )
    old, new = median_ms(per_tree_sample, pids), median_ms(snapshot_sample, pids)
    print(
        f"One sample of {len(pids)} trees: one /proc snapshot {new:.1f} ms vs a scan per tree {old:.1f} ms"
        f" -> {old / new:.1f}x less"
    )
    await pool.close(grace_s=5)
    await close_gateways()
    model.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(main(args.sessions, args.seconds))
