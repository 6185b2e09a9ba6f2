"""The small frozen types the core (pool, store, router) speaks in."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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


class Verdict(enum.StrEnum):
    """A person's answer to an approval request; a timeout is not a denial."""

    APPROVED = "approved"
    DENIED = "denied"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class ToolRequest:
    """The agent wants to run a tool that its policy marks "ask"."""

    tool: str
    summary: str
    # The complete tool input, so an approver can show exactly what will run.
    input: Mapping[str, object] = field(default_factory=dict, compare=False)


class Approver(Protocol):
    """Asks a person on the conversation's channel; returns within the channel's own timeout."""

    async def __call__(self, request: ToolRequest) -> Verdict: ...


@dataclass(frozen=True)
class ToolPolicy:
    """Which tools a turn may use: ``allow`` runs at once, ``ask`` needs an approver, anything else is denied."""

    allow: frozenset[str]
    ask: frozenset[str] = frozenset()
    approver: Approver | None = field(default=None, compare=False)

    @property
    def offered(self) -> frozenset[str]:
        """The tools the model is shown at all; fixed when a CLI process starts."""
        return self.allow | self.ask


@dataclass(frozen=True)
class Inbound:
    """One message for a conversation, from any channel.

    ``files`` are moved into the conversation's workdir (``inbox/``) before the
    turn and named in the prompt.  ``policy`` None means the agent's defaults.
    """

    conversation_id: str
    text: str
    source: str = "api"
    files: tuple[Path, ...] = ()
    policy: ToolPolicy | None = None


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
    files: tuple[Path, ...] = ()

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


class Channel(Protocol):
    """A way in and out (Slack, email, schedules).  The daemon owns its lifecycle.

    ``start`` connects and begins intake; ``stop_intake`` stops taking new
    messages (before the pool drains); ``close`` waits for in-flight
    deliveries, then releases connections.
    """

    name: str

    async def start(self) -> None: ...

    async def stop_intake(self) -> None: ...

    async def close(self) -> None: ...
