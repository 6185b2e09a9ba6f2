"""Warm-hit ratio of the pool's eviction against an ideal LRU cache, on a Zipf trace and on one with a scan.

Run: .venv/bin/python -m tests.bench.bench_lru [--conversations 200] [--pool 20] [--messages 2000]

Both policies are measured: ``eviction = "lfu"`` (the default; goal: at least 1.10x the warm hits
of an ideal LRU of the same size) and ``"lru"`` (goal: matches the ideal LRU). The scan trace is the
Zipf trace with a burst of ``conversations / 2`` new conversations, never seen again, in its middle.

The real pool (routing, admission, eviction, successors, store) runs with a fake launcher whose
"process" answers at once: the figure measures eviction decisions, not the CLI, so 2,000 messages
take seconds instead of the ~10 minutes the real CLI's spawns would. Not a test: it prints a number.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from bot import logs
from bot.config import AgentConfig, LogConfig, PoolConfig, Settings, StoreConfig
from bot.core import Inbound
from bot.pool import LOST_CONTEXT_NOTICE, Pool
from bot.store.sqlite import SqliteStore
from tests.fakes.launcher import InstantLauncher


@dataclass(frozen=True)
class HitRatios:
    pool: float
    ideal: float
    resumed_fresh: int

    @property
    def of_ideal(self) -> float:
        return self.pool / self.ideal if self.ideal else 1.0


def zipf_trace(conversations: int, messages: int, seed: int = 7, exponent: float = 1.0) -> list[int]:
    weights = [1 / rank**exponent for rank in range(1, conversations + 1)]
    return random.Random(seed).choices(range(conversations), weights=weights, k=messages)


def ideal_lru_hits(trace: list[int], capacity: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key in trace:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def with_scan(trace: list[int], conversations: int) -> list[int]:
    """The trace with a burst of one-off conversations in its middle (keys no other message uses)."""
    middle = len(trace) // 2
    burst = list(range(conversations, conversations + conversations // 2))
    return trace[:middle] + burst + trace[middle:]


async def pool_hits(trace: list[int], capacity: int, root: Path, eviction: str = "lfu") -> tuple[int, int]:
    """Warm hits of the real pool on ``trace``, and how many messages got a fresh session instead of a resume."""
    settings = Settings(
        agent=AgentConfig(api_key="sk-bench"),
        pool=PoolConfig(max_sessions=capacity, prewarm=0, memory_budget_mb=1_000_000, eviction=eviction),
        store=StoreConfig(data_dir=root / "data"),
    )
    pool = Pool(settings, InstantLauncher(), SqliteStore(root / "data" / "bench.db", ttl_days=1))
    await pool.start()
    hits = fresh = 0
    try:
        for key in trace:
            conversation = f"api:z{key}"
            hits += pool._live(conversation) is not None
            outcome = await pool.ask(Inbound(conversation, "hi"))
            assert outcome.ok, outcome.error
            fresh += outcome.reply.startswith(LOST_CONTEXT_NOTICE)
    finally:
        await pool.close(grace_s=5)
        await pool.store.close()
    return hits, fresh


async def measure(trace: list[int], capacity: int, root: Path, eviction: str) -> HitRatios:
    hits, fresh = await pool_hits(trace, capacity, root, eviction)
    return HitRatios(pool=hits / len(trace), ideal=ideal_lru_hits(trace, capacity) / len(trace), resumed_fresh=fresh)


async def main(conversations: int, capacity: int, messages: int) -> None:
    logs.configure(LogConfig(level="warning"))
    root = Path(tempfile.mkdtemp(prefix="agentd-lru-"))
    zipf = zipf_trace(conversations, messages)
    traces = {"Zipf": zipf, "Zipf with a scan": with_scan(zipf, conversations)}
    for name, trace in traces.items():
        for eviction, goal in (("lfu", ">= 1.10"), ("lru", ">= 0.95")):
            ratios = await measure(trace, capacity, root / f"{name}-{eviction}".replace(" ", "-"), eviction)
            print(
                f"eviction = {eviction}: {name} trace, {conversations} conversations, pool of {capacity},"
                f" {len(trace)} messages: warm-hit ratio {ratios.pool:.3f} vs ideal LRU {ratios.ideal:.3f}"
                f" -> {ratios.of_ideal:.3f}x (goal {goal})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.conversations, args.pool, args.messages))
