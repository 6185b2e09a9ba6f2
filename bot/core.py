"""The small frozen types the core (pool, store, router) speaks in."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Failure(enum.StrEnum):
    """Why a turn produced no answer. Each maps to one clear user-facing line."""

    BUSY = "busy"
    QUEUE_FULL = "queue_full"
    CRASHED = "crashed"
    MEMORY = "memory"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    AGENT_ERROR = "agent_error"
    SHUTDOWN = "shutdown"
    STORE = "store"


@dataclass(frozen=True)
class Inbound:
    """One message for a conversation, from any channel."""

    conversation_id: str
    text: str
    source: str = "api"


@dataclass(frozen=True)
class Outcome:
    """Exactly one per inbound message: a reply, or a failure with its reason."""

    conversation_id: str
    reply: str
    session_id: str | None
    cost_usd: float
    turns: int
    failure: Failure | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(frozen=True)
class SessionInfo:
    """One row of ``agentd sessions`` and ``GET /v1/sessions``."""

    conversation_id: str
    session_id: str | None
    state: str
    pid: int | None
    rss_mb: float | None
    turns: int
    idle_s: float | None
    cost_usd: float
