"""Fair admission: a light user's wait for a reply while a heavy user floods the pool, against an idle pool.

Run: .venv/bin/python -m tests.bench.bench_fairness [--pool 4] [--light 30]

The real pool (routing, fair admission, eviction) runs with a launcher whose "process" takes a fixed
time per turn (``bench_lru``'s instant session, slowed), so the figure measures admission decisions,
not the CLI. The heavy user keeps ``4 x pool`` slow conversations in flight the whole time; the light
user asks one question at a time, each in a new conversation. Printed: the light user's p95 latency
with the flood against the same on an idle pool, with the per-user cap on (the default) and off.
Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bot import logs
from bot.config import AgentConfig, LogConfig, PoolConfig, Settings, StoreConfig
from bot.core import AgentSession, Inbound, SessionSpec, TurnContext, TurnDone
from bot.pool import Pool
from bot.store.sqlite import SqliteStore
from tests.fakes.launcher import InstantLauncher, InstantSession

HEAVY_TURN_S = 0.4
LIGHT_TURN_S = 0.05


class TimedSession(InstantSession):
    async def turn(self, text: str, context: TurnContext) -> AsyncIterator[TurnDone]:  # type: ignore[override]
        await asyncio.sleep(HEAVY_TURN_S if text.startswith("heavy") else LIGHT_TURN_S)
        async for event in super().turn(text, context):
            yield event  # type: ignore[misc]


class TimedLauncher(InstantLauncher):
    @asynccontextmanager
    async def open(self, spec: SessionSpec) -> AsyncIterator[AgentSession]:
        async with super().open(spec):
            yield TimedSession(spec)


def p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) > 1 else samples[0]


async def light_latencies(root: Path, capacity: int, light: int, flood: bool, cap: int) -> list[float]:
    settings = Settings(
        agent=AgentConfig(api_key="sk-bench"),
        pool=PoolConfig(max_sessions=capacity, prewarm=0, memory_budget_mb=1_000_000, max_busy_per_user=cap),
        store=StoreConfig(data_dir=root / "data"),
    )
    pool = Pool(settings, TimedLauncher(), SqliteStore(root / "data" / "bench.db", ttl_days=1))
    await pool.start()
    stop = asyncio.Event()

    async def heavy(lane: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await pool.ask(Inbound(f"slack:T:C:heavy{lane}-{n}", "heavy", source="slack", user="UHEAVY"))
            await asyncio.sleep(0)  # a refused one comes back at once: let the others run

    lanes = [asyncio.create_task(heavy(i)) for i in range(4 * capacity)] if flood else []
    await asyncio.sleep(HEAVY_TURN_S if flood else 0)  # the flood fills the pool first
    samples = []
    try:
        for i in range(light):
            started = time.perf_counter()
            outcome = await pool.ask(Inbound(f"slack:T:C:light{i}", "light", source="slack", user="ULIGHT"))
            assert outcome.ok, outcome.error
            samples.append(time.perf_counter() - started)
    finally:
        stop.set()
        await asyncio.gather(*lanes)
        await pool.close(grace_s=5)
        await pool.store.close()
    return samples


async def main(capacity: int, light: int) -> None:
    logs.configure(LogConfig(level="error"))
    base = Path(tempfile.mkdtemp(prefix="agentd-fair-"))
    idle = p95(await light_latencies(base / "idle", capacity, light, flood=False, cap=3))
    for cap in (3, 0):
        flooded = p95(await light_latencies(base / f"flood{cap}", capacity, light, flood=True, cap=cap))
        label = f"max_busy_per_user = {cap}" if cap else "no per-user cap"
        print(
            f"fairness ({label}): light user's p95 reply {flooded * 1000:.0f} ms while a heavy user floods a pool"
            f" of {capacity}, against {idle * 1000:.0f} ms on an idle pool -> {flooded / idle:.1f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--light", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(main(args.pool, args.light))
