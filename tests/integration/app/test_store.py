"""One suite, every Store implementation (the ``store`` fixture is parametrized)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from bot.core import ConversationRecord, Inbound, Store, StoreError
from bot.store.redis import RedisStore
from bot.store.sqlite import SqliteStore
from tests.conftest import PoolFactory
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer, free_port


def record(cid: str, **changes: object) -> ConversationRecord:
    base = ConversationRecord(conversation_id=cid, workdir=f"/w/{cid}", config_dir=f"/c/{cid}", created_at=time.time())
    return base.replace(**changes)


async def test_put_get_round_trip(store: Store) -> None:
    assert await store.get("api:none") is None
    saved = record("api:a", session_id="s-1", turns=3, cost_usd=0.5, state="warm")
    await store.put(saved)
    assert await store.get("api:a") == saved


async def test_put_overwrites_whole_record(store: Store) -> None:
    await store.put(record("api:a", turns=1))
    await store.put(record("api:a", turns=2, evict_reason="idle"))
    got = await store.get("api:a")
    assert got is not None and got.turns == 2 and got.evict_reason == "idle"


async def test_list_and_delete(store: Store) -> None:
    for cid in ("api:b", "api:a", "slack:T:C:1.2"):
        await store.put(record(cid))
    assert [r.conversation_id for r in await store.records()] == ["api:a", "api:b", "slack:T:C:1.2"]
    await store.delete("api:b")
    assert [r.conversation_id for r in await store.records()] == ["api:a", "slack:T:C:1.2"]
    assert await store.get("api:b") is None


async def test_unusual_ids_are_kept_verbatim(store: Store) -> None:
    odd = "mail:<abc@example.com>:ünïcode 'quoted' \"x\" ; DROP TABLE"
    await store.put(record(odd))
    got = await store.get(odd)
    assert got is not None and got.conversation_id == odd


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_unknown_fields_from_newer_versions_are_ignored() -> None:
    raw = record("api:x").to_json().replace("{", '{"added_later": 1, ', 1)
    assert ConversationRecord.from_json(raw).conversation_id == "api:x"


async def test_unreachable_redis_raises_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", ttl_days=1)
    with pytest.raises(StoreError, match="redis"):
        await store.ping()
    await store.close()


async def test_corrupt_sqlite_file_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a database"):
        SqliteStore(path, ttl_days=1)


async def test_warm_sessions_survive_redis_restart(
    make_pool: PoolFactory, fake_model: FakeModel, redis_server: RedisServer
) -> None:
    store = RedisStore(redis_server.url, ttl_days=1)
    pool = await make_pool(store=store)
    first = await pool.ask(Inbound("api:r", "before redis restart"))
    pid = pool.live_pids()[0]
    redis_server.stop()
    during = await pool.ask(Inbound("api:r", "while redis is down"))
    assert during.ok and pool.live_pids() == [pid], "a warm session must not need the store"
    redis_server.start()
    after = await pool.ask(Inbound("api:r", "after redis restart"))
    assert after.ok and after.session_id == first.session_id
    saved = await store.get("api:r")
    assert saved is not None and saved.turns == 3, "the next write heals what the outage missed"


async def test_claim_is_granted_once_until_it_expires(store: Store) -> None:
    assert await store.claim("agentd:test:claim", ttl_s=60)
    assert not await store.claim("agentd:test:claim", ttl_s=60)
    assert await store.claim("agentd:test:other", ttl_s=60)


async def test_expired_claim_can_be_taken_again(store: Store) -> None:
    assert await store.claim("agentd:test:short", ttl_s=1)
    assert not await store.claim("agentd:test:short", ttl_s=1)
    deadline = time.monotonic() + 5
    while not await store.claim("agentd:test:short", ttl_s=1):
        assert time.monotonic() < deadline, "an expired claim was never granted again"
        await asyncio.sleep(0.05)


async def test_values_round_trip_and_delete(store: Store) -> None:
    assert await store.get_value("agentd:test:v") is None
    await store.put_value("agentd:test:v", "ünï {json}", ttl_s=60)
    await store.put_value("agentd:test:v", "second", ttl_s=60)
    assert await store.get_value("agentd:test:v") == "second"
    await store.delete_value("agentd:test:v")
    assert await store.get_value("agentd:test:v") is None


async def test_counter_counts_within_its_window(store: Store) -> None:
    assert [await store.incr("agentd:test:n", window_s=60) for _ in range(3)] == [1, 2, 3]
    assert await store.incr("agentd:test:m", window_s=60) == 1


async def test_command_error_raises_store_error_and_keeps_the_connection(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, ttl_days=1)
    try:
        await store._redis.delete("agentd:test:a-list")
        await store._redis.rpush("agentd:test:a-list", "x")
        connection_before = await store._redis.client_id()
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.get_value("agentd:test:a-list")
        assert await store._redis.client_id() == connection_before, "a command error must not drop the connections"
    finally:
        await store.close()


async def test_counter_works_without_redis_7_commands(tmp_path: Path) -> None:
    # EXPIRE ... NX needs Redis 7; with EXPIRE unavailable the counter must still count and expire.
    server = RedisServer(tmp_path / "redis6", extra_args=("--rename-command", "EXPIRE", ""))
    server.start()
    store = RedisStore(server.url, ttl_days=1)
    try:
        assert [await store.incr("agentd:test:n", window_s=60) for _ in range(3)] == [1, 2, 3]
        assert 0 < await store._redis.ttl("agentd:test:n") <= 60
    finally:
        await store.close()
        server.stop()


async def test_float_counters_and_prefix_reads(store: Store) -> None:
    await store.add_floats({"agentd:usage:d1:conversation:a": 0.25, "agentd:usage:d1:global:all": 0.25}, 60)
    await store.add_floats({"agentd:usage:d1:conversation:a": 0.5, "agentd:usage:d2:global:all": 1.0}, 60)
    assert await store.get_values(["agentd:usage:d1:conversation:a", "missing"]) == {
        "agentd:usage:d1:conversation:a": "0.75"
    }
    found = await store.values("agentd:usage:d1:")
    assert {name: float(v) for name, v in found.items()} == {
        "agentd:usage:d1:conversation:a": 0.75,
        "agentd:usage:d1:global:all": 0.25,
    }
    assert await store.values("agentd:usage:d1*") == {}, "a prefix is literal, never a pattern"
