"""Durable intake (``bot.core.Intake``): in the embedded SQLite file, or in a Redis stream per replica.

A message is accepted (written durably) before its source is acknowledged, and forgotten once its
outcome is recorded; the outcome is kept ``keys.INTAKE_OUTCOME_TTL_S`` for retries and lookups. What
was accepted and has no outcome is what a restarted (or surviving) replica runs again.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from bot.core import IntakeEntry, IntakeOutcome, StoreError
from bot.store import keys


class SqliteIntake:
    """The embedded intake: a table beside the store's, in the same file (WAL: one writer at a time)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS intake (key TEXT PRIMARY KEY, conversation TEXT NOT NULL,"
                " payload TEXT NOT NULL, accepted_at REAL NOT NULL, outcome TEXT, recorded_at REAL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"embedded intake {path}: {exc}") from exc

    async def accept(self, entry: IntakeEntry) -> bool:
        rows = await self._run(
            "INSERT INTO intake (key, conversation, payload, accepted_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(key) DO NOTHING RETURNING 1",
            (entry.key, entry.conversation_id, entry.payload, entry.accepted_at),
        )
        return bool(rows)

    async def record(self, key: str, outcome: str) -> None:
        now = time.time()
        await self._run("UPDATE intake SET outcome = ?, recorded_at = ? WHERE key = ?", (outcome, now, key))
        # Old outcomes go; a retry after that long is a new message.
        await self._run("DELETE FROM intake WHERE recorded_at < ?", (now - keys.INTAKE_OUTCOME_TTL_S,))

    async def outcome(self, key: str) -> IntakeOutcome | None:
        rows = await self._run("SELECT outcome, recorded_at FROM intake WHERE key = ? AND outcome IS NOT NULL", (key,))
        return IntakeOutcome(key, rows[0][0], rows[0][1]) if rows else None

    async def pending(self, key: str) -> bool:
        return bool(await self._run("SELECT 1 FROM intake WHERE key = ? AND outcome IS NULL", (key,)))

    async def forget(self, key: str) -> None:
        await self._run("DELETE FROM intake WHERE key = ? AND outcome IS NULL", (key,))

    async def unfinished(self) -> list[IntakeEntry]:
        rows = await self._run(
            "SELECT key, conversation, payload, accepted_at FROM intake WHERE outcome IS NULL"
            " ORDER BY accepted_at, key",
            (),
        )
        return [IntakeEntry(*row) for row in rows]

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)

    async def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._execute, sql, params)

    def _execute(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"embedded intake: {exc}") from exc


# KEYS: stream, accepted.  ARGV: group, consumer, key, conversation, payload, accepted_at, ttl_s.
# Added and read into this replica's pending list in one step, so a crash leaves it pending, never unread.
_ACCEPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local id = redis.call('XADD', KEYS[1], '*', 'key', ARGV[3], 'conversation', ARGV[4], 'payload', ARGV[5],
  'accepted_at', ARGV[6])
redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
redis.call('SET', KEYS[2], KEYS[1] .. '\\n' .. id, 'EX', ARGV[7])
return 1
"""
# KEYS: accepted, outcome.  ARGV: group, outcome_json, ttl_s.  The entry is acknowledged on the stream
# it was accepted into, whichever replica records it (after a failover, not the one that accepted it).
_RECORD = """
local accepted = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
if accepted then
  local stream, id = string.match(accepted, '^(.*)\\n(.*)$')
  redis.call('XACK', stream, ARGV[1], id)
  redis.call('XDEL', stream, id)
end
return 1
"""
# KEYS: accepted, outcome.  ARGV: group.  Off the stream it was accepted into, and its key free for a
# new accept; a message with a recorded outcome is never forgotten (its retries must keep getting it).
_FORGET = """
local accepted = redis.call('GET', KEYS[1])
if accepted and redis.call('EXISTS', KEYS[2]) == 0 then
  local stream, id = string.match(accepted, '^(.*)\\n(.*)$')
  redis.call('XACK', stream, ARGV[1], id)
  redis.call('XDEL', stream, id)
  redis.call('DEL', KEYS[1])
end
return 1
"""


class RedisIntake:
    """A stream per replica, read by that replica's consumer in one group (``keys.INTAKE_GROUP``)."""

    def __init__(self, client: redis.Redis, replica: str) -> None:
        self._redis = client
        self.replica = replica
        self._stream = keys.intake_stream(replica)
        self._accept = client.register_script(_ACCEPT)
        self._record = client.register_script(_RECORD)
        self._forget = client.register_script(_FORGET)
        self._group_ready = False

    async def accept(self, entry: IntakeEntry) -> bool:
        await self._ensure_group()
        accepted = await self._accept(
            keys=[self._stream, keys.intake_accepted(entry.key)],
            args=[
                keys.INTAKE_GROUP,
                self.replica,
                entry.key,
                entry.conversation_id,
                entry.payload,
                repr(entry.accepted_at),
                keys.INTAKE_OUTCOME_TTL_S,
            ],
        )
        return bool(int(accepted))

    async def record(self, key: str, outcome: str) -> None:
        recorded = json.dumps({"outcome": outcome, "recorded_at": time.time()})
        await self._record(
            keys=[keys.intake_accepted(key), keys.intake_outcome(key)],
            args=[keys.INTAKE_GROUP, recorded, keys.INTAKE_OUTCOME_TTL_S],
        )

    async def outcome(self, key: str) -> IntakeOutcome | None:
        raw = await self._redis.get(keys.intake_outcome(key))
        if raw is None:
            return None
        data = json.loads(raw)
        return IntakeOutcome(key, str(data["outcome"]), float(data["recorded_at"]))

    async def pending(self, key: str) -> bool:
        if not await self._redis.exists(keys.intake_accepted(key)):
            return False
        return not await self._redis.exists(keys.intake_outcome(key))

    async def forget(self, key: str) -> None:
        await self._forget(keys=[keys.intake_accepted(key), keys.intake_outcome(key)], args=[keys.INTAKE_GROUP])

    async def unfinished(self) -> list[IntakeEntry]:
        """This replica's pending entries, oldest first (its consumer's history, read from id 0)."""
        await self._ensure_group()
        # RESP2 (redis-py's default): [[stream, [(id, fields), ...]]]; a deleted entry has no fields.
        reply: Any = await self._redis.xreadgroup(keys.INTAKE_GROUP, self.replica, {self._stream: "0"})
        entries: list[tuple[Any, Any]] = reply[0][1] if reply else []
        return [_entry(fields) for _id, fields in entries if fields]

    async def adopt(self, replica: str, min_idle_s: float) -> list[IntakeEntry]:
        """Take over a dead replica's unfinished entries (pending longer than ``min_idle_s``), oldest first.

        Call it only once the replica's heartbeat has expired: a live replica's slow turn would
        otherwise run twice. What is taken is this replica's to run and record from then on.
        """
        stream = keys.intake_stream(replica)
        taken: list[IntakeEntry] = []
        cursor = "0-0"
        while True:
            reply: Any = await self._redis.xautoclaim(
                stream, keys.INTAKE_GROUP, self.replica, int(min_idle_s * 1000), start_id=cursor, count=100
            )
            cursor, entries = _text(reply[0]), reply[1]
            taken += [_entry(fields) for _id, fields in entries if fields]
            if cursor == "0-0":
                return taken

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self._stream, keys.INTAKE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True


def _entry(fields: dict[Any, Any]) -> IntakeEntry:
    text = {_text(k): _text(v) for k, v in fields.items()}
    return IntakeEntry(text["key"], text["conversation"], text["payload"], float(text["accepted_at"]))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
