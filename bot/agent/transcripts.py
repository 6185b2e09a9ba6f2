"""Durable transcripts: a Redis ``SessionStore`` the SDK mirrors every session into.

The CLI writes each transcript to the conversation's Claude state dir on local disk, and the SDK
mirrors every entry it writes to ``RedisSessionStore``.  Local disk stays the working copy: a resume
reads it, and a host that has lost it (a new container, a wiped volume) first restores it from Redis
(``Transcripts.restore``).  So the SDK never materializes a resume into a temp dir outside data_dir,
and the local file always holds the whole history to heal the mirror from after an outage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import redis.asyncio as redis
import structlog
from claude_agent_sdk import (
    ClaudeAgentOptions,
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
    fold_session_summary,
    import_session_to_store,
    project_key_for_directory,
)

# A reach into the SDK's private modules: it exports no way to bring a stored transcript back to disk
# without spawning a CLI, and this is the exact inverse of its mirror (same paths, same subpath checks).
# The SDK version is pinned; tests/unit/test_sdk_private.py fails, naming the version, when the name, its
# signature or the result we read (config_dir/projects, cleanup, RuntimeError on a failed load) change.
from claude_agent_sdk._internal.session_resume import materialize_resume_session
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import metrics
from bot.core import SessionSpec, StoreError
from bot.store import keys

log = structlog.get_logger(__name__)

Flush = Literal["batched", "eager"]
_REPLAY_BATCH = 500


@dataclass(frozen=True)
class _Names:
    """The Redis keys of one SessionKey (all share the session's hash tag, but the project index)."""

    project_key: str
    session_id: str
    subpath: str | None

    @classmethod
    def of(cls, key: SessionKey | SessionListSubkeysKey) -> _Names:
        subpath = key.get("subpath")
        return cls(key["project_key"], key["session_id"], subpath if isinstance(subpath, str) and subpath else None)

    @property
    def main(self) -> bool:
        return self.subpath is None

    @property
    def entries(self) -> str:
        return keys.transcript_entries(self.project_key, self.session_id, self.subpath)

    @property
    def uuids(self) -> str:
        return keys.transcript_uuids(self.project_key, self.session_id, self.subpath)

    @property
    def subkeys(self) -> str:
        return keys.transcript_subkeys(self.project_key, self.session_id)

    @property
    def summary(self) -> str:
        return keys.transcript_summary(self.project_key, self.session_id)

    @property
    def sessions(self) -> str:
        return keys.transcript_sessions(self.project_key)

    def session_keys(self, subpaths: Iterable[str]) -> list[str]:
        """Every key of the whole session: the main transcript's and each subpath's."""
        names = [self.summary, self.subkeys]
        for subpath in (None, *subpaths):
            names += [
                keys.transcript_entries(self.project_key, self.session_id, subpath),
                keys.transcript_uuids(self.project_key, self.session_id, subpath),
            ]
        return names


class RedisSessionStore(SessionStore):
    """The SDK's SessionStore protocol, with every optional method, on Redis.

    A session's entries are a list in append order; a set of their uuids makes a repeated entry (a
    retried batch) a no-op.  An append is one optimistic transaction (WATCH/MULTI) on the session's
    keys, so concurrent appenders neither interleave a batch nor lose a summary fold.  Every append
    renews the whole session's TTL; the project index drops members older than the TTL when read.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._last_mtime = 0

    @classmethod
    def from_url(cls, url: str, ttl_s: int) -> RedisSessionStore:
        # Few, short retries: a mirror append is awaited before the turn's result reaches the user,
        # and the SDK retries a failed batch itself.
        client = redis.Redis.from_url(
            url,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            health_check_interval=15,
            decode_responses=True,
        )
        return cls(client, ttl_s)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    async def close(self) -> None:
        await self._redis.aclose()

    def _next_mtime(self) -> int:
        """Storage write time in epoch ms, strictly increasing within this process."""
        self._last_mtime = max(int(time.time() * 1000), self._last_mtime + 1)
        return self._last_mtime

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        if not entries:
            return
        names = _Names.of(key)
        mtime = self._next_mtime()
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if not await self._append_once(pipe, key, names, entries, mtime):
                        return
                    break
                except WatchError:  # another appender committed first: read again
                    continue
        if names.main:  # the project index is in another slot: not part of the transaction
            async with self._redis.pipeline(transaction=False) as index:
                index.zadd(names.sessions, {names.session_id: mtime})
                index.expire(names.sessions, self._ttl_s)
                await index.execute()

    async def _append_once(
        self, pipe: Pipeline, key: SessionKey, names: _Names, entries: list[SessionStoreEntry], mtime: int
    ) -> bool:
        await pipe.watch(names.uuids, names.summary, names.subkeys)
        state = await _SessionState.read(pipe, names, entries)
        fresh = state.unseen(entries)
        if not fresh:
            return False
        subpaths = state.subpaths | ({names.subpath} if names.subpath else set())
        summary = _folded(key, names, state.summary, fresh, mtime)
        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        pipe.rpush(names.entries, *[json.dumps(e, separators=(",", ":")) for e in fresh])
        uuids = [u for e in fresh if (u := _uuid(e))]
        if uuids:
            pipe.sadd(names.uuids, *uuids)
        if names.subpath:
            pipe.sadd(names.subkeys, names.subpath)
        if summary is not None:
            pipe.set(names.summary, json.dumps(summary))
        for name in names.session_keys(subpaths):
            pipe.expire(name, self._ttl_s)
        await pipe.execute()
        return True

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        raws = await self._redis.lrange(_Names.of(key).entries, 0, -1)
        return [json.loads(raw) for raw in raws] or None

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        index = keys.transcript_sessions(project_key)
        expired_before = int(time.time() * 1000) - self._ttl_s * 1000
        await self._redis.zremrangebyscore(index, "-inf", expired_before)
        rows = cast(list[tuple[str, float]], await self._redis.zrange(index, 0, -1, withscores=True))
        return [{"session_id": str(session_id), "mtime": int(score)} for session_id, score in rows]

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        sessions = await self.list_sessions(project_key)
        if not sessions:
            return []
        # Each summary lives in its own session's slot: plain GETs, not one transaction.
        async with self._redis.pipeline(transaction=False) as pipe:
            for session in sessions:
                pipe.get(keys.transcript_summary(project_key, session["session_id"]))
            raws = await pipe.execute()
        return [json.loads(raw) for raw in raws if raw]

    async def delete(self, key: SessionKey) -> None:
        names = _Names.of(key)
        if names.subpath:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(names.entries, names.uuids)
                pipe.srem(names.subkeys, names.subpath)
                await pipe.execute()
            return
        subpaths = {str(s) for s in await self._redis.smembers(names.subkeys)}
        await self._redis.delete(*names.session_keys(subpaths))
        await self._redis.zrem(names.sessions, names.session_id)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        return sorted(str(s) for s in await self._redis.smembers(_Names.of(key).subkeys))


def _uuid(entry: SessionStoreEntry) -> str | None:
    value = entry.get("uuid")
    return value if isinstance(value, str) and value else None


# One round trip for what an append must know (and Redis 6.0 has no SMISMEMBER): which uuids are
# stored, the session's subpaths, its summary.  KEYS: uuids, subkeys, summary; ARGV: the batch's uuids.
_READ_SESSION = """
local known = {}
for i, id in ipairs(ARGV) do known[i] = redis.call('SISMEMBER', KEYS[1], id) end
return {known, redis.call('SMEMBERS', KEYS[2]), redis.call('GET', KEYS[3])}
"""


@dataclass(frozen=True)
class _SessionState:
    stored: frozenset[str]  # the batch's uuids that are stored already
    subpaths: set[str]
    summary: SessionSummaryEntry | None

    @classmethod
    async def read(cls, pipe: Pipeline, names: _Names, entries: list[SessionStoreEntry]) -> _SessionState:
        ids = list(dict.fromkeys(u for e in entries if (u := _uuid(e))))
        reply = await pipe.eval(_READ_SESSION, 3, names.uuids, names.subkeys, names.summary, *ids)
        known, subpaths, summary = reply
        return cls(
            stored=frozenset(u for u, flag in zip(ids, known, strict=True) if int(flag)),
            subpaths={str(s) for s in subpaths},
            summary=json.loads(summary) if names.main and summary else None,
        )

    def unseen(self, entries: list[SessionStoreEntry]) -> list[SessionStoreEntry]:
        """The entries whose uuid is neither stored already nor earlier in this batch (no uuid: always kept)."""
        seen = set(self.stored)
        fresh = []
        for entry in entries:
            uuid = _uuid(entry)
            if uuid is not None:
                if uuid in seen:
                    continue
                seen.add(uuid)
            fresh.append(entry)
        return fresh


def _folded(
    key: SessionKey, names: _Names, prev: SessionSummaryEntry | None, fresh: list[SessionStoreEntry], mtime: int
) -> SessionSummaryEntry | None:
    if not names.main:  # a subagent's transcript is not the session's summary
        return None
    folded = fold_session_summary(prev, key, fresh)
    folded["mtime"] = mtime  # storage time, the same clock list_sessions reports
    return folded


def _digest(entry: SessionStoreEntry) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Delegating(SessionStore):
    """A view of a RedisSessionStore that passes the optional methods through."""

    def __init__(self, store: RedisSessionStore) -> None:
        self._store = store

    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        return await self._store.list_sessions(project_key)

    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        return await self._store.list_session_summaries(project_key)

    async def delete(self, key: SessionKey) -> None:
        await self._store.delete(key)

    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        return await self._store.list_subkeys(key)


class Backfill(_Delegating):
    """Replays a local transcript into the store without duplicating what is stored already.

    Entries with a uuid are deduped by the store itself.  Entries without one (titles, tags, mode
    markers) are appended by the store as they come, so a replay skips as many copies of each as the
    store already holds: replaying the same file twice, or a file the store holds a prefix of, adds
    exactly what is missing.  One instance per replay: it counts what it has matched so far.
    """

    def __init__(self, store: RedisSessionStore) -> None:
        super().__init__(store)
        self._held: dict[_Names, Counter[str]] = {}

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        held = await self._held_for(key)
        fresh = []
        for entry in entries:
            digest = None if _uuid(entry) else _digest(entry)
            if digest is not None and held[digest] > 0:
                held[digest] -= 1
                continue
            fresh.append(entry)
        await self._store.append(key, fresh)

    async def _held_for(self, key: SessionKey) -> Counter[str]:
        names = _Names.of(key)
        if names not in self._held:
            stored = await self._store.load(key) or []
            self._held[names] = Counter(_digest(e) for e in stored if not _uuid(e))
        return self._held[names]

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return await self._store.load(key)


class _Mirror(_Delegating):
    """What one CLI process is started with: its appends go to Redis, its resume reads local disk.

    ``load`` answers None, so the SDK resumes from the local transcript (restored from Redis
    beforehand when missing) instead of materializing a copy under /tmp.  After a failed append the
    next one replays the whole local file instead (it holds the failed entries: the CLI writes to
    disk before it mirrors), so an outage leaves no gap once Redis is back, and the order is kept.
    """

    def __init__(self, store: RedisSessionStore, projects_dir: Path) -> None:
        super().__init__(store)
        self._projects_dir = projects_dir
        self._gaps: set[_Names] = set()

    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        names = _Names.of(key)
        stored = False
        try:
            if names in self._gaps:
                await self._replay(key, entries)
            else:
                await self._store.append(key, entries)
            stored = True
        finally:
            if stored:
                self._gaps.discard(names)
            else:
                self._gaps.add(names)

    async def _replay(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        path = local_transcript(self._projects_dir, _Names.of(key))
        backfill = Backfill(self._store)
        if not path.is_file():  # nothing local to heal from: store what came
            await backfill.append(key, entries)
            return
        for batch in _jsonl_batches(path):
            await backfill.append(key, batch)
        log.info("mirror_healed", session=key["session_id"], subpath=key.get("subpath"))

    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        return None


def local_transcript(projects_dir: Path, names: _Names) -> Path:
    """Where the CLI keeps a SessionKey's transcript (the SDK's ``file_path_to_session_key``, inverted)."""
    project = projects_dir / names.project_key
    if names.subpath is None:
        return project / f"{names.session_id}.jsonl"
    return project / names.session_id / f"{names.subpath}.jsonl"


def _jsonl_batches(path: Path) -> Iterator[list[SessionStoreEntry]]:
    batch: list[SessionStoreEntry] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                batch.append(json.loads(line))
            if len(batch) >= _REPLAY_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class Durability:
    """How the Redis server keeps data: what ``agentd doctor`` checks for the transcripts."""

    aof: bool
    rdb: bool | None  # None: CONFIG is disabled (as on some managed Redis), so the save points are unknown
    eviction_policy: str

    def problems(self) -> list[str]:
        found = []
        if not self.aof and self.rdb is False:
            found.append("Redis has no persistence (appendonly no, no save points): a restart loses every transcript")
        if not self.aof and self.rdb is None:
            found.append("Redis has no AOF, and its save points cannot be read (CONFIG is disabled)")
        if self.eviction_policy != "noeviction":
            found.append(f"Redis evicts keys (maxmemory-policy {self.eviction_policy}): transcripts can vanish")
        return found


async def durability(client: redis.Redis) -> Durability:
    """Read the persistence and eviction settings of the Redis behind ``client``."""
    persistence = await client.info("persistence")
    memory = await client.info("memory")
    rdb: bool | None
    try:
        rdb = bool(str((await client.config_get("save")).get("save", "")).strip())
    except RedisError:
        rdb = None
    return Durability(
        aof=bool(int(persistence.get("aof_enabled", 0))),
        rdb=rdb,
        eviction_policy=str(memory.get("maxmemory_policy", "unknown")),
    )


class Transcripts:
    """The daemon's side of the mirror: attach it to sessions, restore from it, count its failures."""

    def __init__(self, store: RedisSessionStore, flush: Flush = "batched") -> None:
        self.store = store
        self.flush: Flush = flush
        # Read by the status snapshot; the Prometheus counter is agentd_mirror_errors_total.
        self.mirror_errors = 0
        self.last_mirror_error: str | None = None

    @classmethod
    def from_url(cls, url: str, retention_days: int, flush: Flush = "batched") -> Transcripts:
        return cls(RedisSessionStore.from_url(url, keys.transcript_ttl_s(retention_days)), flush)

    def attach(self, spec: SessionSpec) -> SessionStore:
        """The store one CLI process mirrors into (spares, every profile and resumes alike)."""
        return _Mirror(self.store, spec.config_dir / "projects")

    def mirror_failed(self, conversation_id: str, error: str) -> None:
        self.mirror_errors += 1
        self.last_mirror_error = error[:500]
        metrics.MIRROR_ERRORS.inc()
        log.error("mirror_error", conversation=conversation_id, error=error[:500])

    async def restore(self, spec: SessionSpec) -> bool:
        """Bring a session's transcript from Redis to local disk; False if Redis has none.

        Raises StoreError when Redis cannot be read.
        """
        options = ClaudeAgentOptions(
            cwd=spec.workdir,
            resume=spec.session_id,
            session_store=self.store,
            env={"CLAUDE_CONFIG_DIR": str(spec.config_dir)},
        )
        try:
            materialized = await materialize_resume_session(options)
        except RuntimeError as exc:  # the SDK's wrapping of a failed or timed-out load
            raise StoreError(f"transcripts: {exc}") from exc
        if materialized is None:
            return False
        try:
            shutil.copytree(materialized.config_dir / "projects", spec.config_dir / "projects", dirs_exist_ok=True)
        finally:
            await materialized.cleanup()
        return True

    async def import_data_dir(self, data_dir: Path) -> list[str]:
        """Replay every local transcript under data_dir into Redis (idempotent); the session ids imported.

        For a move from the embedded store or a disk-only setup, and to fill what a mirror error left
        out.  Sets CLAUDE_CONFIG_DIR in this process's environment while it runs (the SDK's import
        reads the transcript location from it): for ``agentd sessions import``, not for the daemon.
        """
        imported: list[str] = []
        for config_dir in sorted((data_dir / "state").glob("*/claude")):
            session_ids = sorted({path.stem for path in config_dir.glob("projects/*/*.jsonl")})
            with _claude_config_dir(config_dir):
                for session_id in session_ids:
                    if await self._import_one(session_id):
                        imported.append(session_id)
        return imported

    async def _import_one(self, session_id: str) -> bool:
        try:
            # No directory: the file is keyed by the project dir the CLI wrote it in, as the mirror keys it.
            await import_session_to_store(session_id, Backfill(self.store))
        except (FileNotFoundError, ValueError) as exc:  # empty, not JSON lines, or no session id as its name
            log.warning("transcript_not_imported", session=session_id[:100], error=str(exc)[:300])
            return False
        except RedisError as exc:
            raise StoreError(f"transcripts: {exc}") from exc
        return True

    async def durability(self) -> Durability:
        return await durability(self.store.client)

    async def close(self) -> None:
        await self.store.close()


@contextmanager
def _claude_config_dir(path: Path) -> Iterator[None]:
    before = os.environ.get("CLAUDE_CONFIG_DIR")
    os.environ["CLAUDE_CONFIG_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CLAUDE_CONFIG_DIR", None)
        else:
            os.environ["CLAUDE_CONFIG_DIR"] = before


def session_key(workdir: Path, session_id: str) -> SessionKey:
    """The SessionKey of a session's main transcript, as the SDK mirrors it from ``workdir``."""
    return {"project_key": project_key_for_directory(workdir), "session_id": session_id}
