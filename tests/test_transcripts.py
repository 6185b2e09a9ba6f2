"""Durable transcripts: the Redis SessionStore, the mirror, and conversations resuming on a fresh host."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from claude_agent_sdk.testing import run_session_store_conformance

from bot import keys
from bot.agent.transcripts import Backfill, RedisSessionStore, Transcripts, durability
from tests.fakes.redis_server import RedisServer

TTL_S = 3600


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[redis.Redis]:
    made = redis.Redis.from_url(redis_server.url, decode_responses=True)
    await made.flushdb()
    yield made
    await made.aclose()


async def test_conformance_with_every_optional_method(client: redis.Redis) -> None:
    async def fresh() -> RedisSessionStore:
        await client.flushdb()
        return RedisSessionStore(client, TTL_S)

    await run_session_store_conformance(fresh)


def test_one_sessions_keys_share_one_hash_tag() -> None:
    """Redis Cluster: an append is one transaction, so every key of a session must map to one slot."""
    for project, session in (("-data-work-a", "0b7c9f1e-aaaa-4bbb-8ccc-123456789abc"), ("p{x}/y", "s}{/z")):
        names = [
            keys.transcript_entries(project, session),
            keys.transcript_entries(project, session, "subagents/agent-1"),
            keys.transcript_uuids(project, session),
            keys.transcript_uuids(project, session, "subagents/agent-1"),
            keys.transcript_subkeys(project, session),
            keys.transcript_summary(project, session),
        ]
        assert {_hash_tag(n) for n in names} == {_hash_tag(names[0])}
        assert _hash_tag(names[0]) != _hash_tag(keys.transcript_entries(project, session + "x"))
        assert _hash_tag(keys.transcript_sessions(project)) is not None


def _hash_tag(name: str) -> str | None:
    """What Redis Cluster hashes: the text between the first '{' and the next '}', when not empty."""
    start = name.find("{")
    end = name.find("}", start + 1)
    return name[start + 1 : end] if start >= 0 and end > start + 1 else None


async def test_entries_keep_their_order_and_a_repeated_uuid_is_stored_once(client: redis.Redis) -> None:
    store = RedisSessionStore(client, TTL_S)
    key = {"project_key": "p", "session_id": "s"}
    await store.append(key, [_e("a"), _e("b"), _e("a")])  # type: ignore[arg-type]
    await store.append(key, [_e("b"), _e("c"), {"type": "tag", "tag": "t"}])  # type: ignore[arg-type]
    await store.append(key, [{"type": "tag", "tag": "t"}, _e("d")])  # type: ignore[arg-type]
    loaded = await store.load(key)  # type: ignore[arg-type]
    assert [e.get("uuid", e["type"]) for e in loaded or []] == ["a", "b", "c", "tag", "tag", "d"]


async def test_every_append_renews_the_sessions_ttl(client: redis.Redis) -> None:
    store = RedisSessionStore(client, TTL_S)
    key = {"project_key": "p", "session_id": "s"}
    sub = {**key, "subpath": "subagents/agent-1"}
    await store.append(sub, [_e("x")])  # type: ignore[arg-type]
    await store.append(key, [_e("a")])  # type: ignore[arg-type]
    for name in await client.keys("agentd:tx:*"):
        assert 0 < await client.ttl(name) <= TTL_S, name


async def test_backfill_replays_a_file_idempotently(client: redis.Redis) -> None:
    store = RedisSessionStore(client, TTL_S)
    key = {"project_key": "p", "session_id": "s"}
    lines = [_e("a"), {"type": "mode", "m": 1}, _e("b"), {"type": "mode", "m": 1}, _e("c")]
    await store.append(key, lines[:2])  # type: ignore[arg-type]  # the mirror stored a prefix
    for _ in range(2):
        await Backfill(store).append(key, lines)  # type: ignore[arg-type]
    assert await store.load(key) == lines  # type: ignore[arg-type]


async def test_durability_reports_persistence_and_eviction(client: redis.Redis) -> None:
    found = await durability(client)
    assert found.aof and found.eviction_policy == "noeviction" and found.problems() == []
    await client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert any("evicts" in p for p in (await durability(client)).problems())
    finally:
        await client.config_set("maxmemory-policy", "noeviction")


def _e(uuid: str) -> dict[str, object]:
    return {"type": "user", "uuid": uuid, "message": {"content": uuid}}


_ = (json, Path, Transcripts)
