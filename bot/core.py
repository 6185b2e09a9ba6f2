"""The small frozen types the core (pool, store, router) speaks in."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


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
    BUDGET = "budget"
    POOL_BUSY = "pool_busy"  # no room within the admission timeout, or the admission queue is full
    USER_LIMIT = "user_limit"  # one user (or mail domain) already has its cap of busy conversations


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
class Profile:
    """What one kind of conversation may do; fixed for a CLI process's life (tools, MCP servers, prompt)."""

    name: str
    tools: frozenset[str]
    ask_tools: frozenset[str] = frozenset()
    mcp: tuple[str, ...] = ()
    system_prompt: str | None = None
    model: str | None = None
    max_turns: int | None = None
    max_budget_usd: float | None = None
    sandbox: bool = True
    deny_read: tuple[Path, ...] = ()
    slack_mentions: bool = False

    @property
    def offered(self) -> frozenset[str]:
        """Built-in tools the model is shown (MCP tools come on top)."""
        return self.tools | self.ask_tools

    def policy(self, approver: Approver | None = None) -> ToolPolicy:
        return ToolPolicy(allow=self.tools - self.ask_tools, ask=self.ask_tools, approver=approver)


@dataclass(frozen=True)
class Inbound:
    """One message for a conversation, from any channel.

    ``files`` are moved into the conversation's workdir (``inbox/``) before the
    turn and named in the prompt.  ``profile`` is the kind of conversation a new
    one becomes (a known conversation keeps the profile it was created with);
    ``approver`` asks a person for the profile's ``ask_tools``.
    """

    conversation_id: str
    text: str
    source: str = "api"
    files: tuple[Path, ...] = ()
    profile: str = "chat"
    approver: Approver | None = field(default=None, compare=False)
    # A scheduled run waits behind a busy conversation, whatever busy_policy says for people.
    waits: bool = False
    # Who sent it (a Slack user id, a mail sender, ``job:<id>``, ``api``): its cost is billed to them.
    user: str = ""


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


@runtime_checkable
class ToolProvider(Protocol):
    """A channel that offers in-process tools (by tool-set name: ``mail``, ``slack``) to profiles naming them."""

    def toolsets(self) -> dict[str, list[ToolSpec]]: ...


# -- the agent: what the pool needs from it (implemented in ``bot.agent``) ------------------


class AgentError(Exception):
    """The agent subprocess could not start or serve a turn."""


class AgentCrashed(AgentError):
    """The CLI died or its stream broke mid-turn."""


class TranscriptMissing(AgentError):
    """A resume found no transcript for the session (a new volume, a wiped disk)."""


@dataclass(frozen=True)
class SessionSpec:
    """Where and as what one CLI process runs."""

    conversation_id: str
    workdir: Path
    config_dir: Path
    data_dir: Path
    session_id: str
    resume: bool
    profile: Profile


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class TurnDone:
    reply: str
    session_id: str
    total_cost_usd: float
    error: str | None
    interrupted: bool
    budget: str | None = None  # why a budget stopped the turn
    metered_usd: float | None = None  # what the gateway metered for this turn (None: no gateway)
    num_turns: int = 0  # model round trips the CLI made for this message


@dataclass(frozen=True)
class TurnContext:
    """What one turn is for: billed to ``user`` on ``channel``; ``approver`` answers the profile's ask_tools."""

    conversation_id: str
    user: str = ""
    channel: str = ""
    approver: Approver | None = field(default=None, compare=False)


class AgentSession(Protocol):
    @property
    def pid(self) -> int | None: ...

    def turn(self, text: str, context: TurnContext) -> AsyncIterator[TextDelta | TurnDone]: ...

    async def preheat(self) -> str | None:
        """Warm a spare without touching its future history; the session id it continues under, if changed."""

    async def interrupt(self) -> None: ...


class Launcher(Protocol):
    def open(self, spec: SessionSpec) -> AbstractAsyncContextManager[AgentSession]: ...


class TranscriptSource(Protocol):
    """Durable copies of transcripts (the Redis mirror), for a host whose local disk has lost one."""

    async def restore(self, spec: SessionSpec) -> bool:
        """Put the session's transcript back on local disk; False if there is no copy.  StoreError if unreachable."""
        ...


# -- in-process tools (MCP) a profile may name: implemented by the channels, served by the agent --


ToolHandler = Callable[[str, Mapping[str, Any]], Awaitable[str]]


@dataclass(frozen=True)
class ToolSpec:
    """One in-process tool.  ``handler(conversation_id, arguments)`` returns the text the model sees."""

    name: str
    description: str
    input_schema: Mapping[str, Any]
    handler: ToolHandler = field(compare=False)


class ToolRefused(Exception):
    """A tool call outside its allowlist; the message is shown to the model as the tool's error."""


class DeliveryError(Exception):
    """A job's result could not be delivered to its target; the message says why."""


@runtime_checkable
class Courier(Protocol):
    """A channel that can deliver a scheduled job's result to a target it understands."""

    async def deliver(self, target: str, subject: str, text: str) -> None:
        """Post or send ``text``; raise DeliveryError when the target cannot be reached."""
