"""The sampler is a task boundary: after a round that raises, it keeps sampling, and the memory kill still fires.

The "CLI" is a plain Python process holding 96 MiB, past a 64 MiB hard ceiling; no CLI is involved.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bot import procs
from bot.config import AgentConfig, PoolConfig, Settings, StoreConfig
from bot.core import AgentCrashed, AgentSession, Failure, Inbound, SessionSpec, TextDelta, TurnContext, TurnDone
from bot.pool import Pool
from bot.store.sqlite import SqliteStore

HOG = "import sys, time; hog = b'x' * (96 << 20); sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)"


class HogSession:
    """A "process" whose turn lasts until it is killed, as a CLI's does when the sampler kills its tree."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def turn(self, text: str, context: TurnContext) -> AsyncIterator[TextDelta | TurnDone]:
        await self._process.wait()
        raise AgentCrashed(f"exit {self._process.returncode}")
        yield  # an async generator, as a session's turn is

    async def interrupt(self) -> None:
        return None

    async def preheat(self) -> str | None:
        return None


class HogLauncher:
    @asynccontextmanager
    async def open(self, spec: SessionSpec) -> AsyncIterator[AgentSession]:
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", HOG, stdout=asyncio.subprocess.PIPE)
        try:
            assert process.stdout is not None
            await process.stdout.readline()  # its memory is held: the first sample sees all of it
            yield HogSession(process)
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def test_after_a_failing_round_sampling_and_the_memory_kill_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        agent=AgentConfig(api_key="sk-unit"),
        pool=PoolConfig(prewarm=0, rss_sample_s=0.05, session_max_rss_mb=32, hard_rss_mb=64),
        store=StoreConfig(data_dir=tmp_path / "data"),
    )
    pool = Pool(settings, HogLauncher(), SqliteStore(tmp_path / "data" / "unit.db", ttl_days=1))
    real_take, rounds = procs.Snapshot.take, 0

    def first_round_fails() -> procs.Snapshot:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise RuntimeError("a bug in one round")
        return real_take()

    monkeypatch.setattr(procs.Snapshot, "take", staticmethod(first_round_fails))
    await pool.start()
    try:
        with capture_logs() as logs:
            outcome = await asyncio.wait_for(pool.ask(Inbound("api:hog", "grow")), timeout=30)
        assert rounds > 1, "the sampler ran again after its failed round"
        assert any(entry["event"] == "rss_sample_failed" for entry in logs), "the failed round was logged"
        assert outcome.failure is Failure.MEMORY, outcome.error
        assert pool._monitor is not None and not pool._monitor.done()
    finally:
        await pool.close(grace_s=5)
        await pool.store.close()
