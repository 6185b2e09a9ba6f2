"""The ledger: budgets checked from memory, spend written in the background, nothing recorded lost."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from bot.config import DEFAULT_MODEL, AgentConfig, BudgetConfig, GatewayConfig, Settings
from bot.core import Caller, Store, StoreError
from bot.gateway.ledger import Ledger, Prices, Usage, today
from bot.gateway.proxy import Gateway
from bot.store import keys
from bot.store.redis import RedisStore
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer
from tests.support.helpers import wait_for

CALLER = Caller("api:c1", "chat", "U1", "api")
# claude-sonnet-4: $3 per million input tokens, so one call costs $3.
ONE_CALL = Usage("claude-sonnet-4-5", input_tokens=1_000_000)


class CountingStore:
    """The real store, counting the reads the budget checks make."""

    def __init__(self, store: Store) -> None:
        self.inner, self.reads = store, 0

    async def get_values(self, names: Sequence[str]) -> dict[str, str]:
        self.reads += 1
        return await self.inner.get_values(names)

    async def add_floats(self, amounts: Mapping[str, float], ttl_s: int) -> None:
        await self.inner.add_floats(amounts, ttl_s)

    async def values(self, prefix: str) -> dict[str, str]:
        return await self.inner.values(prefix)


def budgets(**limits: float) -> BudgetConfig:
    return BudgetConfig(**limits)


async def test_a_budget_check_reads_each_counter_once_then_counts_in_memory(store: Store) -> None:
    counting = CountingStore(store)
    limits = budgets(per_conversation_day_usd=10, global_day_usd=100, refresh_s=60)
    ledger = Ledger(counting, limits, Prices({}))  # type: ignore[arg-type]
    try:
        for _ in range(4):  # $3 each: checked at $0, $3, $6, $9, all under $10
            assert await ledger.check(CALLER, 0.0) is None
            ledger.record(CALLER, ONE_CALL)
        stop = await ledger.check(CALLER, 0.0)
        assert stop is not None and stop.budget == "per_conversation_day"
        assert stop.spent_usd == pytest.approx(12.0)
        assert counting.reads == 1  # the first check only: the rest came from memory
        await ledger.flush()
        name = keys.usage(today(), "conversation", "api:c1")
        assert float((await store.get_values([name]))[name]) == pytest.approx(12.0)
    finally:
        await ledger.close()


async def test_a_replica_sees_another_replicas_spend_within_its_refresh(redis_server: RedisServer) -> None:
    stores = [RedisStore(redis_server.url, ttl_days=1) for _ in range(2)]
    await stores[0]._redis.flushdb()  # type: ignore[attr-defined]
    limits = budgets(global_day_usd=5, refresh_s=0.1)
    first, second = (Ledger(s, limits, Prices({})) for s in stores)
    try:
        assert await second.check(CALLER, 0.0) is None  # known to the second replica: $0
        first.record(CALLER, ONE_CALL)
        first.record(CALLER, ONE_CALL)

        async def second_stops() -> bool:
            return await second.check(CALLER, 0.0) is not None

        await wait_for(second_stops, timeout=10, what="the second replica to see $6 of $5")
        stop = await second.check(CALLER, 0.0)
        assert stop is not None and stop.budget == "global_day" and stop.spent_usd == pytest.approx(6.0)
    finally:
        for ledger in (first, second):
            await ledger.close()
        for s in stores:
            await s.close()


async def test_spend_recorded_while_the_store_is_down_is_written_when_it_is_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    store = RedisStore(server.url, ttl_days=1)
    ledger = Ledger(store, budgets(), Prices({}))
    name = keys.usage(today(), "global", "all")
    try:
        server.stop()
        ledger.record(CALLER, ONE_CALL)
        ledger.record(CALLER, ONE_CALL)
        server.start()  # same port and directory

        async def written() -> bool:
            try:
                stored = await store.get_values([name])
            except StoreError:
                return False
            return float(stored.get(name) or 0) == pytest.approx(6.0)

        await wait_for(written, timeout=20, what="the queued spend to be written")
    finally:
        await ledger.close()
        await store.close()
        server.stop()


async def test_budgets_that_cannot_be_read_refuse_the_request_clearly(tmp_path: Path, fake_model: FakeModel) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    store = RedisStore(server.url, ttl_days=1)
    ledger = Ledger(store, budgets(global_day_usd=5), Prices({}))
    gateway = Gateway(AgentConfig(base_url=fake_model.url, api_key="sk-test"), GatewayConfig(), ledger)
    await gateway.start()
    credential = gateway.issue(CALLER)
    request = {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    try:
        server.stop()
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{gateway.url}/v1/messages", json=request, headers={"x-api-key": credential}) as response,
        ):
            assert response.status == 503
            body = await response.json()
        assert "budget counters are unreachable" in body["error"]["message"]
        assert not fake_model.requests  # not waived: nothing went upstream
    finally:
        await gateway.close()
        await store.close()
        server.stop()


class FlakyStore(CountingStore):
    """The real store, whose first write fails with a bug (not a StoreError)."""

    failed = False

    async def add_floats(self, amounts: Mapping[str, float], ttl_s: int) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in the write path")
        await self.inner.add_floats(amounts, ttl_s)


async def test_a_bug_in_one_write_does_not_stop_the_ledger(store: Store) -> None:
    flaky = FlakyStore(store)
    ledger = Ledger(flaky, budgets(), Prices({}))  # type: ignore[arg-type]
    name = keys.usage(today(), "global", "all")
    try:
        ledger.record(CALLER, ONE_CALL)

        async def written() -> bool:
            stored = await store.get_values([name])
            return float(stored.get(name) or 0) == pytest.approx(3.0)

        await wait_for(written, timeout=20, what="the spend to be written after the failed write")
        assert flaky.failed
    finally:
        await ledger.close()


def test_the_default_model_is_priced_and_an_unknown_one_warns_once() -> None:
    settings = Settings(agent=AgentConfig(api_key="sk-x"))
    assert settings.profile("chat").model == DEFAULT_MODEL and settings.agent.model == DEFAULT_MODEL
    prices = Prices({})
    assert prices.known(DEFAULT_MODEL)
    with capture_logs() as logs:
        for _ in range(3):
            prices.cost(Usage("claude-unpriced-9", input_tokens=1))
    warnings = [e for e in logs if e["event"] == "price_unknown"]
    assert len(warnings) == 1 and 'gateway.prices."claude-unpriced-9"' in warnings[0]["note"]
