"""Conversation state: the embedded (SQLite) implementation of ``bot.core.Store``.

A record maps a conversation to its Claude session id, workdir and counters.
Records are written whole, so a write that failed while the backend was down
is healed by the next one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bot.core import ConversationRecord, Store, StoreError
from bot.store import keys

# The protocol and its values live in bot.core; re-exported for code that imported them from here.
__all__ = ["ConversationRecord", "SqliteStore", "Store", "StoreError"]


_ADD_FLOAT = (
    "INSERT INTO kv (name, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET"
    " value = CASE WHEN kv.expires_at <= ? THEN excluded.value ELSE CAST(kv.value AS REAL) + ? END,"
    " expires_at = CASE WHEN kv.expires_at <= ? THEN excluded.expires_at ELSE kv.expires_at END"
)


class SqliteStore:
    """The embedded default: one SQLite file in ``data_dir``, used from a worker thread."""

    def __init__(self, path: Path, ttl_days: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._ttl_s = keys.conversation_ttl_s(ttl_days)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS conversations ("
                " id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS kv (name TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store {path}: {exc}") from exc

    async def get(self, conversation_id: str) -> ConversationRecord | None:
        rows = await self._run(
            "SELECT record FROM conversations WHERE id = ? AND expires_at > ?",
            (conversation_id, time.time()),
        )
        return ConversationRecord.from_json(rows[0][0]) if rows else None

    async def put(self, record: ConversationRecord) -> None:
        await self._run(
            "INSERT INTO conversations (id, record, expires_at) VALUES (?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at",
            (record.conversation_id, record.to_json(), time.time() + self._ttl_s),
        )

    async def delete(self, conversation_id: str) -> None:
        await self._run("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    async def records(self) -> list[ConversationRecord]:
        rows = await self._run("SELECT record FROM conversations WHERE expires_at > ? ORDER BY id", (time.time(),))
        return [ConversationRecord.from_json(r[0]) for r in rows]

    async def ping(self) -> None:
        await self._run("SELECT 1", ())

    async def claim(self, name: str, ttl_s: int) -> bool:
        now = time.time()
        rows = await self._run(
            "INSERT INTO kv (name, value, expires_at) VALUES (?, '1', ?) ON CONFLICT(name) DO UPDATE"
            " SET value = excluded.value, expires_at = excluded.expires_at WHERE kv.expires_at <= ? RETURNING 1",
            (name, now + ttl_s, now),
        )
        return bool(rows)

    async def get_value(self, name: str) -> str | None:
        rows = await self._run("SELECT value FROM kv WHERE name = ? AND expires_at > ?", (name, time.time()))
        return str(rows[0][0]) if rows else None

    async def put_value(self, name: str, value: str, ttl_s: int) -> None:
        await self._run(
            "INSERT INTO kv (name, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE"
            " SET value = excluded.value, expires_at = excluded.expires_at",
            (name, value, time.time() + ttl_s),
        )

    async def delete_value(self, name: str) -> None:
        await self._run("DELETE FROM kv WHERE name = ?", (name,))

    async def incr(self, name: str, window_s: int) -> int:
        now = time.time()
        rows = await self._run(
            "INSERT INTO kv (name, value, expires_at) VALUES (?, '1', ?) ON CONFLICT(name) DO UPDATE SET"
            " value = CASE WHEN kv.expires_at <= ? THEN 1 ELSE CAST(kv.value AS INTEGER) + 1 END,"
            " expires_at = CASE WHEN kv.expires_at <= ? THEN excluded.expires_at ELSE kv.expires_at END"
            " RETURNING value",
            (name, now + window_s, now, now),
        )
        return int(rows[0][0])

    async def add_floats(self, amounts: Mapping[str, float], ttl_s: int) -> None:
        now = time.time()
        rows = [(name, repr(float(amount)), now + ttl_s, now, amount, now) for name, amount in amounts.items()]
        await asyncio.to_thread(self._execute_many, _ADD_FLOAT, rows)

    async def get_values(self, names: Sequence[str]) -> dict[str, str]:
        if not names:
            return {}
        marks = ",".join("?" * len(names))
        rows = await self._run(
            f"SELECT name, value FROM kv WHERE name IN ({marks}) AND expires_at > ?", (*names, time.time())
        )
        return {str(name): str(value) for name, value in rows}

    async def values(self, prefix: str) -> dict[str, str]:
        # A range on the primary key, not LIKE: no pattern characters to escape, and it uses the index.
        rows = await self._run(
            "SELECT name, value FROM kv WHERE name >= ? AND name < ? AND expires_at > ?",
            (prefix, prefix + "\U0010ffff", time.time()),
        )
        return {str(name): str(value) for name, value in rows}

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)

    async def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._execute, sql, params)

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            with self._lock, self._db:
                self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store: {exc}") from exc

    def _execute(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store: {exc}") from exc
