"""agentd benchmark: what mirroring transcripts to Redis costs a warm turn (P2 with the store, against without).

Run: .venv/bin/python -m tests.bench.bench_mirror [--repeats N]
Not a test: it prints ratios measured in the same run; nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bot import logs
from bot.agent import ClaudeLauncher
from bot.agent.transcripts import Flush, Transcripts
from bot.config import HttpConfig, LogConfig
from bot.gateway.ledger import Ledger, Prices
from bot.gateway.proxy import Gateway
from bot.http import Api
from bot.pool import Pool
from bot.store.sqlite import SqliteStore
from tests.bench.bench_pool import bare_turn, connected_bare, median_ms, timed
from tests.conftest import make_settings
from tests.fakes.model import FakeModel
from tests.fakes.model_process import ModelProcess
from tests.fakes.redis_server import RedisServer


@dataclass(frozen=True)
class MirrorCost:
    bare_ms: float
    without_ms: float
    with_ms: dict[str, float]  # flush mode -> median API turn

    def lines(self) -> list[str]:
        without = self.without_ms
        lines = [f"P2 API turn without the mirror {without:.1f} ms ({without / self.bare_ms:.2f}x bare)"]
        for flush, ms in self.with_ms.items():
            lines.append(
                f"P2 API turn mirrored to Redis ({flush}) {ms:.1f} ms -> {ms / self.without_ms:.2f}x without,"
                f" {ms / self.bare_ms:.2f}x bare (bare ClaudeSDKClient turn {self.bare_ms:.1f} ms)"
            )
        return lines


Upstream = FakeModel | ModelProcess  # anything with the fake model's url


async def pool_with(model: Upstream, root: Path, gateways: list[Gateway], transcripts: Transcripts | None) -> Pool:
    """A pool as the daemon runs it (behind a gateway), mirroring to Redis when ``transcripts`` is given."""
    settings = make_settings(root / uuid.uuid4().hex, model)
    store = SqliteStore(settings.store.data_dir / "bench.db", ttl_days=1)
    gateway = Gateway(settings.agent, settings.gateway, Ledger(store, settings.budget, Prices({})))
    await gateway.start()
    gateways.append(gateway)
    launcher = ClaudeLauncher(settings.agent, gateway=gateway, transcripts=transcripts)
    made = Pool(settings, launcher, store, transcripts=transcripts)
    await made.start()
    return made


Turn = Callable[[], Awaitable[object]]


async def api_poster(pool: Pool, stack: AsyncExitStack) -> Turn:
    """One warm conversation behind the HTTP API (the P2 path), already past its first turn."""
    api = Api(HttpConfig(listen="127.0.0.1:0", api_token="bench"), pool, pool.store)
    await api.start()
    stack.push_async_callback(api.stop)
    http = await stack.enter_async_context(aiohttp.ClientSession(headers={"Authorization": "Bearer bench"}))
    url = f"http://127.0.0.1:{api.port}/v1/conversations/bench/messages"

    async def post() -> None:
        async with http.post(url, json={"text": "api turn"}) as response:
            assert response.status == 200, await response.text()

    await post()
    return post


async def measure(model: Upstream, redis_url: str, root: Path, repeats: int) -> MirrorCost:
    """Every variant served one turn per round, in turn: load from elsewhere on the machine hits all alike."""
    gateways: list[Gateway] = []
    flushes: tuple[Flush, ...] = ("batched", "eager")
    mirrors = {flush: Transcripts.from_url(redis_url, retention_days=1, flush=flush) for flush in flushes}
    pools: dict[str, Pool] = {}
    async with AsyncExitStack() as stack:
        for transcripts in mirrors.values():
            stack.push_async_callback(transcripts.close)
        stack.push_async_callback(_close_all, pools, gateways)
        for name, transcripts in {"without": None, **mirrors}.items():
            pools[name] = await pool_with(model, root, gateways, transcripts)
        turns = {name: await api_poster(pool, stack) for name, pool in pools.items()}
        bare, _ = await connected_bare(model, root / "bare")  # type: ignore[arg-type]  # reads only its url
        stack.push_async_callback(bare.disconnect)
        turns["bare"] = lambda: bare_turn(bare, "bare warm")
        samples: dict[str, list[float]] = {name: [] for name in turns}
        for _ in range(repeats):
            for name, turn in turns.items():
                samples[name].append(await timed(turn))
        for flush, transcripts in mirrors.items():
            assert transcripts.mirror_errors == 0, (flush, transcripts.last_mirror_error)
    medians = {name: median_ms(values) for name, values in samples.items()}
    return MirrorCost(medians["bare"], medians["without"], {flush: medians[flush] for flush in flushes})


async def _close_all(pools: dict[str, Pool], gateways: list[Gateway]) -> None:
    for pool in pools.values():
        await pool.close(grace_s=5)
        await pool.store.close()
    for gateway in gateways:
        await gateway.close()


async def main(repeats: int) -> None:
    logs.configure(LogConfig(level="warning"))
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-mirror-"))
    # The upstream runs in a process of its own, as a real one does (as in bench_pool).
    model = ModelProcess.start()
    redis_server = RedisServer(root / "redis")
    redis_server.start()
    try:
        print(f"# agentd mirror benchmark: medians of {repeats} warm turns, fake model in its own process, Redis")
        for line in (await measure(model, redis_server.url, root, repeats)).lines():
            print(line)
    finally:
        redis_server.stop()
        model.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    asyncio.run(main(parser.parse_args().repeats))
