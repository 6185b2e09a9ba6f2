"""The small frozen types and the protocols the parts speak in: engine, store, channels, API, gateway.

Every component is typed against these, not against another's concrete class, so each can be
replaced (a fake in a test, a forwarding pool later) without touching its callers.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # a type only: importing aiohttp here would slow every CLI command's start
    from aiohttp import web


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


# -- conversations: what the channels and the API submit messages to (implemented by ``bot.pool``) --


class TurnHandle(Protocol):
    """One message in flight: its reply text as it streams, then exactly one outcome."""

    def stream(self) -> AsyncIterator[str]: ...

    @property
    def outcome(self) -> Awaitable[Outcome]: ...


class Conversations(Protocol):
    """Where a channel's messages go; one implementation today, the local pool."""

    async def submit(self, inbound: Inbound) -> TurnHandle:
        """Queue the message; the handle streams its reply and resolves to its outcome."""
        ...

    async def ask(self, inbound: Inbound) -> Outcome:
        """Submit and wait for the outcome."""
        ...

    async def info(self, conversation_id: str) -> SessionInfo | None:
        """The conversation's session, live or stored; None if it has none."""
        ...

    async def reset(self, conversation_id: str) -> None:
        """Forget the conversation's Claude session: its next message starts a fresh one (its files stay)."""
        ...

    async def cancel(self, conversation_id: str) -> bool:
        """Stop the running turn (queued messages still run); False if none was running."""
        ...


# -- HTTP routes a component serves on the daemon's API server -------------------------------


RouteHandler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True)
class Route:
    """One endpoint of a component's own (Slack HTTP Events); the handler does its own authentication."""

    method: str
    path: str
    handler: RouteHandler = field(compare=False)


@runtime_checkable
class RouteProvider(Protocol):
    """A component that offers HTTP routes; the daemon mounts them on the API server, as it mounts tool sets."""

    def routes(self) -> list[Route]: ...


# -- conversation state (implemented by ``bot.store`` and ``bot.store.redis``) --------------------


class StoreError(Exception):
    """The store backend could not be reached or answered wrongly."""


@dataclass(frozen=True)
class ConversationRecord:
    conversation_id: str
    workdir: str
    config_dir: str
    session_id: str | None = None
    profile: str = "chat"
    state: str = "evicted"
    turns: int = 0
    cost_usd: float = 0.0
    created_at: float = 0.0
    updated_at: float = 0.0
    evict_reason: str | None = None
    # Sessions this conversation had before its transcript was lost (oldest first); kept for the record.
    previous_session_ids: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ConversationRecord:
        data: dict[str, Any] = json.loads(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        fields["previous_session_ids"] = tuple(fields.get("previous_session_ids", ()))
        return cls(**fields)

    def replace(self, **changes: Any) -> ConversationRecord:
        return dataclasses.replace(self, updated_at=time.time(), **changes)


class Store(Protocol):
    async def get(self, conversation_id: str) -> ConversationRecord | None: ...

    async def put(self, record: ConversationRecord) -> None: ...

    async def delete(self, conversation_id: str) -> None: ...

    async def records(self) -> list[ConversationRecord]: ...

    async def ping(self) -> None:
        """Raise StoreError unless the backend answers."""

    async def close(self) -> None: ...

    # Small named values with a lifetime: dedupe claims, checkpoints, outboxes,
    # counters.  Names come from ``bot.store.keys``.

    async def claim(self, name: str, ttl_s: int) -> bool:
        """Set ``name`` unless it is already set: True for exactly one caller per TTL."""

    async def get_value(self, name: str) -> str | None: ...

    async def put_value(self, name: str, value: str, ttl_s: int) -> None: ...

    async def delete_value(self, name: str) -> None: ...

    async def incr(self, name: str, window_s: int) -> int:
        """Count within a window that starts at the first increment."""

    async def add_floats(self, amounts: Mapping[str, float], ttl_s: int) -> None:
        """Add to numbers (each created at 0 with ``ttl_s``, which later adds keep), in one round trip."""

    async def get_values(self, names: Sequence[str]) -> dict[str, str]:
        """The live values among ``names``, in one round trip."""

    async def values(self, prefix: str) -> dict[str, str]:
        """Every live value whose name starts with ``prefix`` (ledger reports)."""


# -- durable intake: every accepted message gets exactly one outcome, across crashes --------------


@dataclass(frozen=True)
class IntakeEntry:
    """An inbound message, written durably before its source is acknowledged."""

    key: str  # its identity at the source (Slack event id, Message-ID, Idempotency-Key, job occurrence)
    conversation_id: str
    payload: str  # JSON: what its channel needs to run it again after a crash
    accepted_at: float


@dataclass(frozen=True)
class IntakeOutcome:
    key: str
    outcome: str  # JSON: the outcome as its channel recorded it
    recorded_at: float


class Intake(Protocol):
    """Accept, then record the outcome, then forget: what was accepted and never finished is replayed."""

    async def accept(self, entry: IntakeEntry) -> bool:
        """True for the first acceptance of ``entry.key``; False for a retry or replay of it."""

    async def record(self, key: str, outcome: str) -> None:
        """The message's one outcome; from now on ``outcome(key)`` returns it and it is not replayed."""

    async def outcome(self, key: str) -> IntakeOutcome | None: ...

    async def pending(self, key: str) -> bool:
        """Accepted, and neither recorded nor forgotten yet."""

    async def forget(self, key: str) -> None:
        """Drop an accepted message that was refused before it ran: the next ``accept`` of its key is new."""

    async def unfinished(self) -> list[IntakeEntry]:
        """Accepted, no outcome yet, oldest first: after a crash, these are run again."""


# -- duties: work one replica at a time may do ------------------------------------------------


class DutyLost(Exception):
    """This replica no longer holds the duty (a newer holder exists): the write was refused."""


class Duty(Protocol):
    """Work only one replica may do at a time (the IMAP intake). With replicas on one Redis a lease
    decides which; alone, the one daemon always holds it."""

    @property
    def held(self) -> bool: ...

    async def run(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` whenever this replica holds the duty, until it returns or ``stop``; losing the duty
        cancels it, and it runs again once the duty is held again."""

    def stop(self) -> None: ...

    async def put_value(self, name: str, value: str, ttl_s: int) -> None:
        """A store write only the holder may make (fenced); raises ``DutyLost`` once a newer holder exists."""


# -- status: what ``/status`` asks of the channels and the transcript mirror ------------------------


@dataclass(frozen=True)
class ChannelStatus:
    """One channel's connection. Fields a channel has no notion of stay None."""

    name: str
    connected: bool
    reconnects: int
    last_idle_renewal: float | None = None  # IMAP: when the current IDLE was (re)issued, Unix seconds
    checkpoint_uid: int | None = None  # IMAP: the last UID taken from the mailbox
    stopped: str | None = None  # why the channel stopped for good (Slack: the app was uninstalled)
    standby: bool = False  # with replicas: another one holds this channel's intake (the IMAP duty)


class MirrorHealth(Protocol):
    """What the transcript mirror counts of its failures."""

    mirror_errors: int
    last_mirror_error: str | None


@runtime_checkable
class StatusReporter(Protocol):
    """A channel that can say how its connection is doing."""

    async def status(self) -> ChannelStatus: ...


# -- metering: what the launcher needs of the model gateway (implemented by ``bot.gateway``) --------


@dataclass(frozen=True)
class Caller:
    """Who a model request is for: fixed per CLI process, except the user and channel of the current turn."""

    conversation_id: str
    profile: str
    user: str = ""
    channel: str = ""


@dataclass(frozen=True)
class BudgetStop:
    """A request refused by a budget: which one, what was spent, when it resets."""

    budget: str
    spent_usd: float
    limit_usd: float
    resets: str

    @property
    def text(self) -> str:
        return (
            f"the {self.budget.replace('_', ' ')} budget is used up: ${self.spent_usd:.4f} spent of "
            f"${self.limit_usd:.4f}; it resets {self.resets}"
        )


class Meter(Protocol):
    """Issues each CLI process its own credential and meters that process's turns against the budgets."""

    @property
    def url(self) -> str:
        """Where the CLI sends its model requests."""
        ...

    def issue(self, caller: Caller) -> str: ...

    def revoke(self, credential: str) -> None: ...

    def begin_turn(self, credential: str, conversation_id: str, user: str, channel: str) -> None: ...

    def answer_locally(self, credential: str, on: bool) -> None:
        """While on, the gateway answers the process itself (a spare's warm-up): no upstream call, no cost."""
        ...

    def turn_spent(self, credential: str) -> float: ...

    def stopped(self, credential: str) -> BudgetStop | None:
        """The budget that stopped the current turn, if one did."""
        ...
