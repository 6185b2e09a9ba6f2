"""The gateway's overhead per model request: the same streamed request straight to the fake model and through it.

Run: .venv/bin/python -m tests.bench.bench_gateway [--requests 300]

Both paths use one pooled aiohttp client on loopback; the gateway path adds credential lookup, the
budget check (from memory after the first read of each counter), streaming through and metering
(store writes in the background). Goal: <= 2 ms median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bot import logs
from bot.config import AgentConfig, BudgetConfig, GatewayConfig, LogConfig
from bot.core import Caller
from bot.gateway.ledger import Ledger, Prices
from bot.gateway.proxy import Gateway
from bot.store.sqlite import SqliteStore
from tests.fakes.model import FakeModel

REQUEST = {
    "model": "claude-sonnet-4-5",
    "stream": True,
    "max_tokens": 64,
    "tools": [{"name": "noop", "input_schema": {"type": "object"}}],
    "messages": [{"role": "user", "content": "benchmark"}],
}


async def timed(http: aiohttp.ClientSession, url: str, headers: dict[str, str], count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        async with http.post(f"{url}/v1/messages", json=REQUEST, headers=headers) as response:
            await response.read()
        seconds.append(time.perf_counter() - started)
    return seconds


async def measure(count: int) -> tuple[float, float]:
    """Median milliseconds: straight to the model, through the gateway."""
    logs.configure(LogConfig(level="warning", format="console"))
    model = FakeModel()
    await model.start()
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.db", ttl_days=1)
        budgets = BudgetConfig(per_conversation_day_usd=1e9, per_user_day_usd=1e9, global_day_usd=1e9)
        ledger = Ledger(store, budgets, Prices({}))
        gateway = Gateway(AgentConfig(base_url=model.url, api_key="sk-bench"), GatewayConfig(), ledger)
        await gateway.start()
        credential = gateway.issue(Caller("api:bench", "chat", "api", "api"))
        try:
            async with aiohttp.ClientSession() as http:
                await timed(http, model.url, {"x-api-key": "sk-bench"}, 20)  # warm both paths
                await timed(http, gateway.url, {"x-api-key": credential}, 20)
                direct, through = [], []
                for _ in range(count // 50):  # interleaved rounds: drift affects both alike
                    direct += await timed(http, model.url, {"x-api-key": "sk-bench"}, 50)
                    through += await timed(http, gateway.url, {"x-api-key": credential}, 50)
        finally:
            await gateway.close()
            await store.close()
            await model.stop()
    return statistics.median(direct) * 1000, statistics.median(through) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    direct, through = asyncio.run(measure(args.requests))
    print(
        f"Gateway: median streamed request {direct:.2f} ms direct vs {through:.2f} ms through the gateway "
        f"-> {through - direct:.2f} ms overhead (goal <= 2 ms)"
    )


if __name__ == "__main__":
    main()
