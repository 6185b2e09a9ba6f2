"""agentd benchmark: what mirroring transcripts to Redis costs a warm turn (P2 with the store, against without).

Run: .venv/bin/python -m tests.bench.bench_mirror [--repeats N]
Not a test: it prints ratios measured in the same run; nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from bot import logs
from bot.agent import ClaudeLauncher
from bot.agent.transcripts import Flush, Transcripts
from bot.config import LogConfig
from bot.gateway import Gateway
from bot.ledger import Ledger, Prices
from bot.pool import Pool
from bot.store import SqliteStore
from tests.bench.bench_pool import api_turns, bare_warm, median_ms
from tests.conftest import make_settings
from tests.fakes.model import FakeModel
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


async def pool_with(model: FakeModel, root: Path, gateways: list[Gateway], transcripts: Transcripts | None) -> Pool:
    """A pool as the daemon runs it (behind a gateway), mirroring to Redis when ``transcripts`` is given."""
    settings = make_settings(root / uuid.uuid4().hex, model)
    store = SqliteStore(settings.store.data_dir / "bench.db", ttl_days=1)
    gateway = Gateway(settings.agent, settings.gateway, Ledger(store, settings.budget, Prices({})))
    await gateway.start()
    gateways.append(gateway)
    launcher = ClaudeLauncher(settings.agent, gateway=gateway, transcripts=transcripts)
    made = Pool(settings, launcher, store, transcripts)
    await made.start()
    return made


async def p2_median(model: FakeModel, root: Path, repeats: int, transcripts: Transcripts | None) -> float:
    gateways: list[Gateway] = []
    pool = await pool_with(model, root, gateways, transcripts)
    try:
        return median_ms(await api_turns(pool, repeats))
    finally:
        await pool.close(grace_s=5)
        await pool.store.close()
        for gateway in gateways:
            await gateway.close()


async def measure(model: FakeModel, redis_url: str, root: Path, repeats: int) -> MirrorCost:
    bare = median_ms(await bare_warm(model, root, repeats))
    without = await p2_median(model, root, repeats, None)
    mirrored: dict[str, float] = {}
    flushes: tuple[Flush, ...] = ("batched", "eager")
    for flush in flushes:
        transcripts = Transcripts.from_url(redis_url, retention_days=1, flush=flush)
        try:
            mirrored[flush] = await p2_median(model, root, repeats, transcripts)
            assert transcripts.mirror_errors == 0, transcripts.last_mirror_error
        finally:
            await transcripts.close()
    return MirrorCost(bare, without, mirrored)


async def main(repeats: int) -> None:
    logs.configure(LogConfig(level="warning"))
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-mirror-"))
    model = FakeModel()
    await model.start()
    redis_server = RedisServer(root / "redis")
    redis_server.start()
    try:
        print(f"# agentd mirror benchmark: medians of {repeats} warm turns, fake model and Redis on loopback")
        for line in (await measure(model, redis_server.url, root, repeats)).lines():
            print(line)
    finally:
        redis_server.stop()
        await model.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    asyncio.run(main(parser.parse_args().repeats))
