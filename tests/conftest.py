from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.agent import ClaudeLauncher
from bot.config import AgentConfig, HttpConfig, PoolConfig, Settings, StoreConfig
from bot.core import Store
from bot.pool import Pool
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from tests.fakes.mailserver import MailServer
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer
from tests.fakes.slack import FakeSlack
from tests.support import daemon_proc, leaks

RUN = pytest.StashKey[leaks.RunSnapshot]()


@pytest.fixture(scope="session", autouse=True)
def _snapshot_processes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Before the first test: what runs already, so the session-end check blames only this run."""
    request.config.stash[RUN] = leaks.RunSnapshot.take(tmp_path_factory.getbasetemp(), leaks.mark_environment())


UNIT = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/unit/ are the pure ones: ``bash tests/run -m unit`` runs them alone."""
    for item in items:
        if item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.unit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process it started outlives it; list and kill each one."""
    snapshot = session.config.stash.get(RUN, None)
    if snapshot is None:
        return
    leaked = leaks.settle(snapshot.leaks())
    if not leaked:
        return
    print(f"\nprocesses left behind by this test run ({len(leaked)}), now killed:", file=sys.stderr)
    for proc in leaked:
        print(f"  {leaks.describe(proc)}", file=sys.stderr)
    leaks.kill(leaked)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _kill_leftover_daemons() -> Iterator[None]:
    """A daemon subprocess a test left running, or that died by itself, goes with its CLI processes."""
    yield
    while daemon_proc.STARTED:
        daemon_proc.STARTED.pop().kill()


@pytest.fixture
def mail() -> Iterator[MailServer]:
    """A real Dovecot (IMAP + LMTP) behind an SMTP hop, in a temp dir on free ports."""
    server = MailServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_model() -> AsyncIterator[FakeModel]:
    model = FakeModel()
    await model.start()
    yield model
    await model.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (with AOF): it starts empty, and stopping it disturbs no other test."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    made: Store
    if request.param == "sqlite":
        made = SqliteStore(tmp_path / "state.db", ttl_days=1)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = RedisStore(server.url, ttl_days=1)
        await made._redis.flushdb()  # type: ignore[attr-defined]
    yield made
    await made.close()


def make_settings(tmp_path: Path, model: FakeModel, **sections: Any) -> Settings:
    agent = {"base_url": model.url, "api_key": "sk-test-key", "model": "claude-sonnet-4-5", **sections.get("agent", {})}
    pool = {"prewarm": 0, **sections.get("pool", {})}
    store = {"data_dir": tmp_path / "data", **sections.get("store", {})}
    return Settings(
        agent=AgentConfig(**agent),
        pool=PoolConfig(**pool),
        store=StoreConfig(**store),
        http=HttpConfig(**sections.get("http", {})),
        **{
            key: sections[key]
            for key in ("profiles", "triage", "schedule", "slack", "email", "budget", "gateway")
            if key in sections
        },
    )


PoolFactory = Callable[..., Awaitable[Pool]]


@pytest.fixture
async def make_pool(tmp_path: Path, fake_model: FakeModel) -> AsyncIterator[PoolFactory]:
    pools: list[Pool] = []

    async def factory(store: Store | None = None, **sections: dict[str, Any]) -> Pool:
        settings = make_settings(tmp_path, fake_model, **sections)
        used = store or SqliteStore(settings.store.data_dir / "state.db", ttl_days=1)
        pool = Pool(settings, ClaudeLauncher(settings.agent), used)
        await pool.start()
        pools.append(pool)
        return pool

    yield factory
    for pool in pools:
        await pool.close(grace_s=5)
        await pool.store.close()
