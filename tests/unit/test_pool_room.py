"""Room decisions (admission, victim choice, LRU and frequency order): pure, and on a pool with an instant launcher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import AgentConfig, PoolConfig, Settings, StoreConfig
from bot.core import Inbound
from bot.pool import Pool
from bot.pool.room import Limits, Occupant, conversation_fits, spare_fits, victim
from bot.store.sqlite import SqliteStore
from tests.fakes.launcher import InstantLauncher

LIMITS = Limits(max_sessions=2, max_processes=3, memory_budget_mb=1000, spawn_estimate_mb=100, lfu=False)


def never_used(conversation_id: str) -> int:
    return 0


# -- the pure decisions ------------------------------------------------------------------


def test_a_conversation_fits_under_every_limit_and_retiring_processes_still_count() -> None:
    assert conversation_fits([Occupant("a")], LIMITS)
    assert not conversation_fits([Occupant("a"), Occupant("b", retiring=True)], LIMITS), "max_sessions"
    assert not conversation_fits([Occupant("a"), Occupant("s1", spare=True), Occupant("s2", spare=True)], LIMITS)
    assert not conversation_fits([Occupant("a", rss_mb=950)], LIMITS), "the memory budget"
    # A process not measured yet counts as the spawn estimate.
    assert conversation_fits([Occupant("a", rss_mb=None)], LIMITS)


def test_a_spare_counts_the_spares_started_but_not_admitted() -> None:
    assert spare_fits([Occupant("a")], pending_spares=1, limits=LIMITS)
    assert not spare_fits([Occupant("a")], pending_spares=2, limits=LIMITS)


def test_no_victim_while_there_is_room_or_the_retiring_ones_cover_it() -> None:
    assert victim([Occupant("a", idle=True)], LIMITS, never_used) is None
    retiring = [Occupant("a", idle=True, last_used=1), Occupant("b", retiring=True)]
    assert victim(retiring, LIMITS, never_used) is None


def test_the_victim_is_the_least_recent_idle_conversation_and_never_a_busy_one() -> None:
    old, new, busy = Occupant("old", idle=True, last_used=1), Occupant("new", idle=True, last_used=2), Occupant("b")
    assert victim([new, old], LIMITS, never_used) is old
    assert victim([busy, new], LIMITS, never_used) is new
    assert victim([busy, Occupant("c")], LIMITS, never_used) is None


def test_spares_go_first_unless_a_conversation_slot_is_missing() -> None:
    spare = Occupant("spare:1", spare=True, idle=True, last_used=9)
    idle = Occupant("a", idle=True, last_used=1)
    # Processes short (3 of 3) with a conversation slot free: a spare goes before any conversation.
    assert victim([idle, Occupant("spare:2", spare=True), spare], LIMITS, never_used) is spare
    # Conversations short (2 of 2): retiring a spare would free no slot.
    assert victim([idle, Occupant("b", idle=True, last_used=5), spare], LIMITS, never_used) is idle


def test_lfu_keeps_the_busy_conversation_and_lru_ignores_how_often() -> None:
    busy = Occupant("busy", idle=True, last_used=1)
    once = Occupant("once", idle=True, last_used=2)
    uses = {"busy": 5, "once": 1}.__getitem__
    assert victim([busy, once], LIMITS, uses) is busy
    lfu = Limits(max_sessions=2, max_processes=3, memory_budget_mb=1000, spawn_estimate_mb=100, lfu=True)
    assert victim([busy, once], lfu, uses) is once


# -- the real pool, with a launcher that answers at once ---------------------------------------


@pytest.fixture
async def small_pool(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pool]:
    settings = Settings(
        agent=AgentConfig(api_key="sk-unit"),
        pool=PoolConfig(max_sessions=2, prewarm=0, eviction=request.param),
        store=StoreConfig(data_dir=tmp_path / "data"),
    )
    pool = Pool(settings, InstantLauncher(), SqliteStore(tmp_path / "data" / "unit.db", ttl_days=1))
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close(grace_s=5)
        await pool.store.close()


async def ask_all(pool: Pool, *conversations: str) -> None:
    for conversation in conversations:
        outcome = await pool.ask(Inbound(f"api:{conversation}", "hi"))
        assert outcome.ok and outcome.reply == "hi", outcome.error


@pytest.mark.parametrize("small_pool", ["lru"], indirect=True)
async def test_lru_pool_evicts_the_least_recent_conversation(small_pool: Pool) -> None:
    await ask_all(small_pool, "busy", "busy", "busy", "once", "new")
    assert small_pool._live("api:busy") is None
    assert small_pool._live("api:once") is not None and small_pool._live("api:new") is not None


@pytest.mark.parametrize("small_pool", ["lfu"], indirect=True)
async def test_lfu_pool_keeps_the_busy_conversation_through_a_one_off(small_pool: Pool) -> None:
    await ask_all(small_pool, "busy", "busy", "busy", "once", "new")
    assert small_pool._live("api:once") is None
    assert small_pool._live("api:busy") is not None and small_pool._live("api:new") is not None


@pytest.mark.parametrize("small_pool", ["lfu"], indirect=True)
async def test_an_evicted_conversation_comes_back_resumed(small_pool: Pool) -> None:
    await ask_all(small_pool, "a", "b", "c", "a")
    record = await small_pool.store.get("api:a")
    assert record is not None and record.turns == 2, "the successor resumed the same session"
