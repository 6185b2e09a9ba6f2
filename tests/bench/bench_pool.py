"""agentd benchmark: ratios against baselines measured in the same run, on the fake model.

Run: .venv/bin/python -m tests.bench.bench_pool [--repeats N] [--quick] [--spares]
Not a test: it prints numbers; nothing asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

from bot import logs, procs
from bot.agent import ClaudeLauncher
from bot.config import HttpConfig, LogConfig
from bot.core import Inbound
from bot.gateway.ledger import Ledger, Prices
from bot.gateway.proxy import Gateway
from bot.http import Api
from bot.pool import Pool
from bot.store.sqlite import SqliteStore
from tests.conftest import make_settings
from tests.fakes.model_process import ModelProcess
from tests.support.helpers import wait_until


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bare_options(model: ModelProcess, workdir: Path, resume: str | None = None) -> ClaudeAgentOptions:
    return ClaudeAgentOptions(
        cwd=workdir,
        model="claude-sonnet-4-5",
        setting_sources=[],
        resume=resume,
        env={
            "ANTHROPIC_BASE_URL": model.url,
            "ANTHROPIC_API_KEY": "sk-bench",
            "CLAUDE_CONFIG_DIR": str(workdir / ".cfg"),
        },
    )


async def bare_turn(client: ClaudeSDKClient, text: str) -> str:
    await client.query(text)
    session = ""
    async for message in client.receive_response():
        if isinstance(message, ResultMessage):
            session = message.session_id
    return session


async def connected_bare(model: ModelProcess, workdir: Path) -> tuple[ClaudeSDKClient, str]:
    """A bare SDK client (no agentd) that has served one turn, and its session id."""
    workdir.mkdir()
    client = ClaudeSDKClient(bare_options(model, workdir))
    await client.connect()
    return client, await bare_turn(client, "warm up")


async def p1_interleaved(model: ModelProcess, pool: Pool, root: Path, repeats: int) -> tuple[list[float], list[float]]:
    """A warm follow-up on the pool and an ephemeral resume (connect, turn, disconnect), alternately."""
    workdir = root / "ephemeral"
    client, session = await connected_bare(model, workdir)
    await client.disconnect()
    samples, warm = [], []
    for i in range(repeats):
        warm.append(await timed(lambda: pool.ask(Inbound("api:warm", "warm turn"))))

        async def once(i: int = i) -> None:
            c = ClaudeSDKClient(bare_options(model, workdir, resume=session))
            await c.connect()
            await bare_turn(c, f"ephemeral {i}")
            await c.disconnect()

        samples.append(await timed(once))
    return warm, samples


async def p2_interleaved(model: ModelProcess, pool: Pool, root: Path, repeats: int) -> tuple[list[float], list[float]]:
    """A bare client's warm turn and an API turn, alternately, so drift in the machine's load hits both alike."""
    client, _ = await connected_bare(model, root / "bare")
    api = Api(HttpConfig(listen="127.0.0.1:0", api_token="bench"), pool, pool.store)
    await api.start()
    url = f"http://127.0.0.1:{api.port}/v1/conversations/bench/messages"
    bare, through_api = [], []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer bench"}) as http:

        async def post() -> None:
            async with http.post(url, json={"text": "api turn"}) as response:
                assert response.status == 200, await response.text()

        await post()
        await bare_turn(client, "bare warm")
        for _ in range(repeats):
            bare.append(await timed(lambda: bare_turn(client, "bare warm")))
            through_api.append(await timed(post))
    await api.stop()
    await client.disconnect()
    return bare, through_api


async def first_reply(pool: Pool, repeats: int, spare: bool, warm_pool: Pool) -> tuple[list[float], list[float]]:
    """A new conversation's first reply, each beside a warm turn of another pool (the ratio's baseline)."""
    firsts, warms = [], []
    for _ in range(repeats):
        if spare:
            await wait_until(lambda: pool._spares and all(s.preheated for s in pool._spares), 30)
        warms.append(await timed(lambda: warm_pool.ask(Inbound("api:warm", "warm turn"))))
        firsts.append(await timed(lambda: pool.ask(Inbound(f"api:{uuid.uuid4().hex}", "first"))))
    return firsts, warms


async def spares_settled(pool: Pool) -> None:
    await wait_until(lambda: bool(pool._spares) and all(s.preheated for s in pool._spares), 60)


async def p2r_interleaved(pool: Pool, repeats: int) -> tuple[list[float], list[float], list[float]]:
    """A warm turn right after another conversation adopted the spare (so the pool refills), and the same
    warm turn with the spares settled, alternately; the adopting first replies give P3 on the side."""
    await pool.ask(Inbound("api:warm", "warm up"))
    refilling, settled, firsts = [], [], []
    for _ in range(repeats):
        await spares_settled(pool)
        settled.append(await timed(lambda: pool.ask(Inbound("api:warm", "warm turn"))))
        adopter = f"api:{uuid.uuid4().hex}"
        firsts.append(await timed(lambda a=adopter: pool.ask(Inbound(a, "first"))))  # type: ignore[misc]
        refilling.append(await timed(lambda: pool.ask(Inbound("api:warm", "warm turn"))))
        # The adopter goes, so the next round starts from one warm conversation and a settled spare.
        await pool.reset(adopter)
        await wait_until(lambda: len(pool._admitted) == 2, 60)
    return refilling, settled, firsts


def ratio(samples: list[float], baseline: list[float]) -> str:
    return f"{statistics.median(samples) / statistics.median(baseline):.2f}x"


async def spares_only(model: ModelProcess, root: Path, repeats: int, pause_max_s: float | None = None) -> None:
    """P2r: a warm turn while the pool refills the spare one conversation just adopted, against one with it settled.

    ``pause_max_s`` 0 turns the pacing of spares off (the figure before it), None keeps the default."""
    paced = {} if pause_max_s is None else {"spare_pause_max_s": pause_max_s}
    pool = await make_pool(model, root, prewarm=1, **paced)
    refilling, settled, firsts = await p2r_interleaved(pool, repeats)
    await pool.close(grace_s=5)
    print(
        f"P2r warm turn while the pool refills a spare {median_ms(refilling):.1f} ms vs spares settled"
        f" {median_ms(settled):.1f} ms -> {ratio(refilling, settled)} (goal <= 1.25x)"
        f" [refilling {min(refilling) * 1000:.0f}-{max(refilling) * 1000:.0f} ms]"
    )
    print(f"P3 first reply with a spare {median_ms(firsts):.1f} ms -> {ratio(firsts, settled)} a settled warm turn")


async def rss_growth(pool: Pool) -> dict[int, float]:
    marks: dict[int, float] = {}
    for turn in range(1, 51):
        await pool.ask(Inbound("api:rss", f"turn {turn} " + "x" * 2000))
        if turn in (1, 10, 50):
            worker = pool._workers["api:rss"]
            assert worker.pid is not None
            marks[turn] = procs.tree_rss_mb(worker.pid) or 0.0
    return marks


async def fleet(pool: Pool, conversations: int, turns: int) -> tuple[int, int, float, float]:
    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(procs.tree_rss_mb(p) or 0.0 for p in pool.live_pids()))
            await asyncio.sleep(0.1)

    async def conversation(i: int) -> list[str]:
        return [(await pool.ask(Inbound(f"api:fleet{i}", f"c{i} t{t}"))).reply for t in range(turns)]

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    replies = await asyncio.gather(*(conversation(i) for i in range(conversations)))
    elapsed = time.perf_counter() - started
    watcher.cancel()
    expected = {f"echo: c{i} t{t}" for i in range(conversations) for t in range(turns)}
    got = [r for rs in replies for r in rs]
    lost = len(expected - set(got))
    duplicated = len(got) - len(set(got))
    return lost, duplicated, peak, elapsed


GATEWAYS: list[Gateway] = []


async def close_gateways() -> None:
    """Close every gateway ``make_pool`` started."""
    while GATEWAYS:
        await GATEWAYS.pop().close()


async def make_pool(model: ModelProcess, root: Path, **pool: object) -> Pool:
    """A pool as the daemon runs it: every CLI talks to the model through a gateway."""
    settings = make_settings(root / uuid.uuid4().hex, model, pool=dict(pool))
    store = SqliteStore(settings.store.data_dir / "bench.db", ttl_days=1)
    gateway = Gateway(settings.agent, settings.gateway, Ledger(store, settings.budget, Prices({})))
    await gateway.start()
    GATEWAYS.append(gateway)
    made = Pool(settings, ClaudeLauncher(settings.agent, gateway=gateway), store)
    await made.start()
    return made


async def main(repeats: int, quick: bool, only_spares: bool = False, pause_max_s: float | None = None) -> None:
    logs.configure(LogConfig(level="warning"))
    # The upstream runs in a process of its own, as a real one does: it must not share the daemon's loop.
    model = ModelProcess.start()
    root = Path(tempfile.mkdtemp(prefix="agentd-bench-"))
    print(f"# agentd benchmark: medians of {repeats} runs, fake model on loopback in its own process")
    if only_spares:
        await spares_only(model, root, repeats, pause_max_s)
        await close_gateways()
        model.stop()
        return

    warm_pool = await make_pool(model, root)
    await warm_pool.ask(Inbound("api:warm", "warm up"))
    warm, ephemeral = await p1_interleaved(model, warm_pool, root, repeats)
    print(
        f"P1 warm follow-up {median_ms(warm):.1f} ms vs ephemeral resume {median_ms(ephemeral):.1f} ms"
        f" -> {statistics.median(ephemeral) / statistics.median(warm):.1f}x faster (goal >= 10x)"
    )

    bare, api = await p2_interleaved(model, warm_pool, root, repeats)
    print(
        f"P2 API turn {median_ms(api):.1f} ms vs bare ClaudeSDKClient turn {median_ms(bare):.1f} ms"
        f" -> {statistics.median(api) / statistics.median(bare):.2f}x (goal <= 1.15x)"
    )
    spare_pool = await make_pool(model, root, prewarm=1)
    with_spare, warm_beside = await first_reply(spare_pool, repeats, True, warm_pool)
    await spare_pool.close(grace_s=5)
    cold_pool = await make_pool(model, root)
    cold, _ = await first_reply(cold_pool, repeats, False, warm_pool)
    await cold_pool.close(grace_s=5)
    await warm_pool.close(grace_s=5)
    warm_p3 = statistics.median(warm_beside)
    print(
        f"P3 first reply with a spare {median_ms(with_spare):.1f} ms -> "
        f"{statistics.median(with_spare) / warm_p3:.2f}x a warm turn (goal <= 1.5x);"
        f" without a spare {median_ms(cold):.1f} ms -> {statistics.median(cold) / warm_p3:.2f}x"
    )

    rss_pool = await make_pool(model, root)
    marks = await rss_growth(rss_pool)
    await rss_pool.close(grace_s=5)
    print(
        "RSS per session (CLI process tree): " + ", ".join(f"after {t} turns {mb:.0f} MiB" for t, mb in marks.items())
    )

    conversations, turns = (20, 3) if quick else (100, 3)
    budget = 20 * 300
    fleet_pool = await make_pool(model, root, max_sessions=20, memory_budget_mb=budget, spawn_estimate_mb=280)
    lost, duplicated, peak, elapsed = await fleet(fleet_pool, conversations, turns)
    await fleet_pool.close(grace_s=5)
    print(
        f"Fleet {conversations} conversations x {turns} turns through a pool of 20:"
        f" {lost} lost, {duplicated} duplicated,"
        f" peak RSS sum {peak:.0f} MiB vs memory_budget_mb {budget} ({elapsed:.1f} s)"
    )
    await spares_only(model, root, repeats)
    await close_gateways()
    model.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="20 conversations instead of 100")
    parser.add_argument("--spares", action="store_true", help="only P2r and P3 (a spare refilling beside warm turns)")
    parser.add_argument("--spare-pause-max-s", type=float, help="pool.spare_pause_max_s for P2r (0: spares not paced)")
    args = parser.parse_args()
    asyncio.run(main(args.repeats, args.quick, args.spares, args.spare_pause_max_s))
