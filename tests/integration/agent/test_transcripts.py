"""Durable transcripts: the Redis SessionStore, the mirror, and conversations resuming on a fresh host."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as redis
from claude_agent_sdk.testing import run_session_store_conformance

from bot.agent import ClaudeLauncher
from bot.agent.transcripts import Backfill, RedisSessionStore, Transcripts, durability
from bot.app.wiring import unstable_data_dir
from bot.core import Inbound
from bot.pool import LOST_CONTEXT_NOTICE, Pool
from bot.store import keys
from bot.store.sqlite import SqliteStore
from tests.bench.bench_mirror import measure
from tests.conftest import make_settings
from tests.fakes.model import FakeModel
from tests.fakes.redis_server import RedisServer
from tests.support import paths
from tests.support.daemon_proc import DaemonProcess
from tests.support.helpers import wait_until

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


def test_a_symlinked_data_dir_gets_a_warning(tmp_path: Path) -> None:
    real = tmp_path / "mnt-disk-3f2a"
    real.mkdir()
    (tmp_path / "data").symlink_to(real)
    warning = unstable_data_dir(tmp_path / "data")
    assert warning is not None and str(real) in warning and "same path" in warning
    assert unstable_data_dir(real) is None


# -- a whole daemon: a conversation outlives its host's disk ----------------------------------


def host(tmp_path: Path, model: FakeModel, server: RedisServer) -> DaemonProcess:
    """A daemon on ``tmp_path/data`` (the same path on every "host") and the shared Redis."""
    return DaemonProcess(tmp_path, model.url, extra_env={"REDIS_URL": server.url})


async def replace_host(old: DaemonProcess, tmp_path: Path, model: FakeModel, server: RedisServer) -> DaemonProcess:
    """kill -9 the daemon and wipe its data dir completely, then start a new one on the same path."""
    old.kill()
    shutil.rmtree(old.data_dir)
    new = host(tmp_path, model, server)
    await new.start()
    return new


async def test_a_fresh_host_resumes_the_session_with_its_whole_history(
    tmp_path: Path, fake_model: FakeModel, own_redis: RedisServer
) -> None:
    a = host(tmp_path, fake_model, own_redis)
    await a.start()
    first = await a.ask("move", "remember the word heliotrope")
    b = await replace_host(a, tmp_path, fake_model, own_redis)
    second = await b.ask("move", "what was the word")
    await b.stop()
    assert "error" not in second, second
    assert second["session_id"] == first["session_id"] and second["turns"] == 2
    assert "heliotrope" in fake_model.find("what was the word")[-1].all_text()


async def test_a_fresh_host_resumes_after_a_redis_restart(
    tmp_path: Path, fake_model: FakeModel, own_redis: RedisServer
) -> None:
    a = host(tmp_path, fake_model, own_redis)
    await a.start()
    first = await a.ask("aof", "remember the word marigold")
    a.kill()
    own_redis.restart()  # what survives is what the AOF kept
    b = await replace_host(a, tmp_path, fake_model, own_redis)
    second = await b.ask("aof", "what was the word")
    await b.stop()
    assert second["session_id"] == first["session_id"] and second["turns"] == 2
    assert "marigold" in fake_model.find("what was the word")[-1].all_text()


async def test_a_mirror_outage_mid_turn_is_counted_and_healed(
    tmp_path: Path, fake_model: FakeModel, own_redis: RedisServer
) -> None:
    fake_model.add("slow question", text="slow answer", delay_s=1.0)
    a = host(tmp_path, fake_model, own_redis)
    await a.start()
    await a.ask("gap", "remember the word heliotrope")
    in_flight = asyncio.create_task(a.ask("gap", "a slow question about tulips"))
    await wait_until(lambda: bool(fake_model.find("slow question")), what="the slow turn to reach the model")
    own_redis.stop()
    during = await in_flight
    assert during["reply"] == "slow answer", during  # the turn completes without its mirror
    assert await mirror_errors(a) >= 1
    async with aiohttp.ClientSession(headers=a.headers) as http, http.get(f"{a.url}/v1/status") as response:
        mirror = (await response.json())["mirror"]
    assert mirror["mirror_errors"] >= 1 and mirror["last_error"], mirror  # shown on /status too
    own_redis.start()
    after = await a.ask("gap", "and now about roses")  # its append replays what the outage missed
    assert "error" not in after, after
    b = await replace_host(a, tmp_path, fake_model, own_redis)
    last = await b.ask("gap", "what did we talk about")
    await b.stop()
    assert last["session_id"] == during["session_id"] and last["turns"] == 4
    seen = fake_model.find("what did we talk about")[-1].all_text()
    assert all(word in seen for word in ("heliotrope", "tulips", "slow answer", "roses")), seen


async def test_sessions_import_backfills_what_the_mirror_missed(
    tmp_path: Path, fake_model: FakeModel, own_redis: RedisServer
) -> None:
    a = host(tmp_path, fake_model, own_redis)
    await a.start()
    first = await a.ask("late", "remember the word saffron")
    await a.stop()
    client = redis.Redis.from_url(own_redis.url)
    # As if the daemon had run on the embedded store, or every append had failed: no transcript in Redis.
    await client.delete(*[name async for name in client.scan_iter("agentd:tx:*")])
    stored = []
    for _ in range(2):  # idempotent: the second run adds nothing
        result = await asyncio.to_thread(run_cli, a, "sessions", "import")
        assert result.returncode == 0, result.stderr
        assert re.match(r"imported [1-9]\d* transcripts", result.stdout), result.stdout
        stored.append([await client.llen(name) async for name in client.scan_iter("agentd:tx:*:entries*")])
    await client.aclose()
    assert stored[0] and sum(stored[0]) == sum(stored[1])
    b = await replace_host(a, tmp_path, fake_model, own_redis)
    second = await b.ask("late", "what was the word")
    await b.stop()
    assert second["session_id"] == first["session_id"]
    request = fake_model.find("what was the word")[-1]
    assert "saffron" in request.all_text()
    # user, assistant, user: imported twice, the first turn still reaches the model once
    assert [m["role"] for m in request.messages] == ["user", "assistant", "user"]


async def test_sessions_import_without_redis_is_a_config_error(tmp_path: Path, fake_model: FakeModel) -> None:
    daemon = DaemonProcess(tmp_path, fake_model.url)
    result = await asyncio.to_thread(run_cli, daemon, "sessions", "import")
    assert result.returncode == 2 and "redis_url" in result.stderr


async def test_sessions_import_with_redis_down_fails_clearly(
    tmp_path: Path, fake_model: FakeModel, own_redis: RedisServer
) -> None:
    daemon = host(tmp_path, fake_model, own_redis)
    await daemon.start()
    await daemon.ask("down", "hello")
    await daemon.stop()
    own_redis.stop()
    result = await asyncio.to_thread(run_cli, daemon, "sessions", "import")
    own_redis.start()
    assert result.returncode == 1 and "transcripts:" in result.stderr
    assert own_redis.password not in result.stderr + result.stdout


def run_cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.app.cli", "--config", str(daemon.config), *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=paths.ROOT,
    )


async def mirror_errors(daemon: DaemonProcess) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/metrics") as response:
        text = await response.text()
    found = re.search(r"^agentd_mirror_errors_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_mirror_benchmark_runs(tmp_path: Path, fake_model: FakeModel, redis_server: RedisServer) -> None:
    """The benchmark's code path, on two turns, so it cannot rot."""
    cost = await measure(fake_model, redis_server.url, tmp_path, repeats=2)
    assert set(cost.with_ms) == {"batched", "eager"} and all(ms > 0 for ms in cost.with_ms.values())


# -- bad input: what Redis or the disk hold may be damaged -------------------------------------


@pytest.fixture
async def mirrored_pool(tmp_path: Path, fake_model: FakeModel, redis_server: RedisServer) -> AsyncIterator[Pool]:
    """An in-process pool whose processes mirror to Redis, evicting an idle process after 0.3 s."""
    settings = make_settings(tmp_path, fake_model, pool={"idle_timeout_s": 0.3})
    transcripts = Transcripts.from_url(redis_server.url, retention_days=1)
    store = SqliteStore(settings.store.data_dir / "state.db", ttl_days=1)
    pool = Pool(settings, ClaudeLauncher(settings.agent, transcripts=transcripts), store, transcripts=transcripts)
    await pool.start()
    yield pool
    await pool.close(grace_s=5)
    await store.close()
    await transcripts.close()


async def test_a_damaged_transcript_in_redis_starts_a_fresh_session(
    mirrored_pool: Pool, fake_model: FakeModel, redis_server: RedisServer
) -> None:
    pool = mirrored_pool
    first = await pool.ask(Inbound("api:dmg", "remember plum"))
    await wait_until(lambda: not pool.live_pids(), what="idle eviction")
    shutil.rmtree(pool.data_dir / "state")
    client = redis.Redis.from_url(redis_server.url)
    damaged = [name async for name in client.scan_iter(f"agentd:tx:*{first.session_id}*:entries")]
    assert damaged
    await client.rpush(damaged[0], "{not json")
    await client.aclose()
    second = await pool.ask(Inbound("api:dmg", "what fruit?"))
    assert second.ok, second.error
    assert second.reply.startswith(LOST_CONTEXT_NOTICE) and second.session_id != first.session_id
    third = await pool.ask(Inbound("api:dmg", "still there?"))  # and the conversation goes on
    assert third.ok and third.session_id == second.session_id


async def test_import_skips_a_damaged_local_transcript_and_imports_the_rest(
    tmp_path: Path, client: redis.Redis, redis_server: RedisServer
) -> None:
    good, bad = "0b7c9f1e-aaaa-4bbb-8ccc-123456789abc", "1b7c9f1e-aaaa-4bbb-8ccc-123456789abc"
    projects = tmp_path / "state" / "api-x" / "claude" / "projects" / "-work-api-x"
    projects.mkdir(parents=True)
    (projects / f"{good}.jsonl").write_text(json.dumps(_e("a")) + "\n" + json.dumps(_e("b")) + "\n")
    (projects / f"{bad}.jsonl").write_text(json.dumps(_e("c")) + "\n{not json\n")
    (projects / "not-a-session.jsonl").write_text(json.dumps(_e("d")) + "\n")
    transcripts = Transcripts.from_url(redis_server.url, retention_days=1)
    try:
        assert await transcripts.import_data_dir(tmp_path) == [good]
        loaded = await transcripts.store.load({"project_key": "-work-api-x", "session_id": good})
    finally:
        await transcripts.close()
    assert [e["uuid"] for e in loaded or []] == ["a", "b"]
