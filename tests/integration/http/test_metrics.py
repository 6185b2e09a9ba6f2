"""/metrics, scraped as Prometheus does: sessions by state and profile, spawns, resumes, evictions, crashes,
queue depth and per-process RSS (labelled by pid, and gone with the process)."""

from __future__ import annotations

import asyncio
import contextlib
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bot.config import HttpConfig
from bot.core import Inbound
from bot.http import Api
from bot.pool import Pool
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.support.helpers import gone, wait_for, wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextlib.asynccontextmanager
async def served(make_pool: PoolFactory) -> AsyncIterator[tuple[Pool, str]]:
    pool = await make_pool(pool={"rss_sample_s": 0.1})
    server = Api(HttpConfig(listen="127.0.0.1:0"), pool, pool.store)
    await server.start()
    try:
        yield pool, f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rss_pids(samples: Samples) -> set[str]:
    return {dict(labels)["pid"] for name, labels in samples if name == "agentd_process_rss_bytes"}


async def test_metrics_cover_sessions_spawns_resumes_crashes_queue_and_rss_by_pid(
    make_pool: PoolFactory, fake_model: FakeModel
) -> None:
    fake_model.add("slow one", text="done slowly", delay_s=1.5)
    async with served(make_pool) as (pool, url):
        before = await scrape(url)
        assert (await pool.ask(Inbound("api:m1", "first"))).ok
        pid = pool._workers["api:m1"].pid
        assert pid is not None
        after: Samples = {}

        async def sampled() -> bool:
            after.update(await scrape(url))
            return str(pid) in rss_pids(after) and value(after, "agentd_sessions", state="warm") >= 1

        await wait_for(sampled, what="the sampler to export the new process")
        assert value(after, "agentd_process_rss_bytes", pid=str(pid)) > 10 * 1024 * 1024
        assert value(after, "agentd_sessions_by_profile", profile="chat") == 1
        assert value(after, "agentd_sessions", state="busy") == 0
        spawned = value(after, "agentd_spawns_total", kind="new") - value(before, "agentd_spawns_total", kind="new")
        assert spawned == 1
        assert not any("conversation" in dict(labels) for _, labels in after), "no series names a conversation"
        assert not any("api:m1" in v for _, labels in after for _, v in labels)

        # A slow turn with two messages behind it: busy, and a queue depth of two.
        slow = await pool.submit(Inbound("api:m1", "slow one"))
        queued = [await pool.submit(Inbound("api:m1", f"behind {i}")) for i in range(2)]

        async def busy_with_a_queue() -> bool:
            now = await scrape(url)
            return value(now, "agentd_sessions", state="busy") == 1 and value(now, "agentd_queue_depth") == 2

        await wait_for(busy_with_a_queue, what="a busy session with two queued messages")
        await asyncio.gather(slow.outcome, *(t.outcome for t in queued))

        # The CLI dies while idle: a crash, an eviction ("died"), and its pid's RSS series goes.
        crashes = value(after, "agentd_crashes_total", kind="idle")
        died = value(after, "agentd_evictions_total", reason="died")
        process = psutil.Process(pid)
        process.kill()
        await wait_until(lambda: gone(process), what="the CLI to die")

        async def crash_counted() -> bool:
            now = await scrape(url)
            return str(pid) not in rss_pids(now) and value(now, "agentd_sessions_by_profile", profile="chat") == 0

        await wait_for(crash_counted, what="the dead process to be retired and its series removed")
        final = await scrape(url)
        assert value(final, "agentd_crashes_total", kind="idle") == crashes + 1
        assert value(final, "agentd_evictions_total", reason="died") == died + 1
        assert [e.kind for e in pool.status().events] == ["crash", "evict"]

        # The next message resumes the session in a new process.
        resumes = value(final, "agentd_spawns_total", kind="resume")
        assert (await pool.ask(Inbound("api:m1", "again"))).ok
        assert value(await scrape(url), "agentd_spawns_total", kind="resume") == resumes + 1


async def test_promtool_accepts_the_metrics(make_pool: PoolFactory, fake_model: FakeModel) -> None:
    """Prometheus's own linter (Debian's prometheus package; tests/run installs it) finds nothing to fix."""
    async with served(make_pool) as (pool, url):
        assert (await pool.ask(Inbound("api:lint", "first"))).ok
        await wait_for(lambda: _exported_rss(url), what="the sampler to export the process's RSS")
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
            text = await response.read()
    promtool = await asyncio.create_subprocess_exec(
        "promtool", "check", "metrics", stdin=PIPE, stdout=PIPE, stderr=STDOUT
    )
    said, _ = await asyncio.wait_for(promtool.communicate(text), 60)
    assert promtool.returncode == 0, said.decode()


async def _exported_rss(url: str) -> bool:
    return bool(rss_pids(await scrape(url)))
