"""One message in flight (``Turn``), what each failure tells the sender, and driving one turn of a session.

Shared by the pool's workers and ``agentd once``: both map a turn's result to a ``Failure`` the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot import metrics
from bot.core import (
    AgentCrashed,
    AgentSession,
    ConversationRecord,
    Failure,
    Inbound,
    Outcome,
    TextDelta,
    TurnContext,
    TurnDone,
)

FAILURE_TEXT = {
    Failure.BUSY: "The agent is busy with an earlier message here; send this again when it has answered.",
    Failure.QUEUE_FULL: "Too many messages are waiting in this conversation; this one was not accepted.",
    Failure.CRASHED: "The agent process stopped unexpectedly; the next message resumes the conversation.",
    Failure.MEMORY: "The agent exceeded its memory ceiling and was stopped; the next message resumes the conversation.",
    Failure.TIMEOUT: "The agent took too long and was stopped; the next message resumes the conversation.",
    Failure.INTERRUPTED: "This turn was stopped before it finished.",
    Failure.AGENT_ERROR: "The agent could not complete this turn.",
    Failure.SHUTDOWN: "The daemon is shutting down; this message was not processed.",
    Failure.STORE: "The conversation store is unreachable; try again shortly.",
    Failure.BUDGET: "A spending limit stopped this turn.",
    Failure.POOL_BUSY: "Every agent is busy right now and this message could not get a turn in time; "
    "send it again shortly.",
    Failure.USER_LIMIT: "You already have as many conversations running or waiting as one person may; "
    "send this again when one of them has answered.",
}


def failure_of(done: TurnDone) -> Failure | None:
    """A finished turn's failure, if any: a budget stop first, then an interrupt, then the agent's error."""
    if done.budget is not None:
        return Failure.BUDGET
    if done.interrupted:
        return Failure.INTERRUPTED
    return Failure.AGENT_ERROR if done.error else None


def failure_detail(done: TurnDone) -> str:
    """Why a failed turn failed, in the words of whoever stopped it."""
    return done.budget or done.error or "interrupted"


async def drive(session: AgentSession, prompt: str, context: TurnContext, on_text: Callable[[str], None]) -> TurnDone:
    """Run one turn to its result, passing each streamed text on; a stream without a result is a crash."""
    async for event in session.turn(prompt, context):
        if isinstance(event, TextDelta):
            on_text(event.text)
        else:
            return event
    raise AgentCrashed("the agent's turn ended without a result")


def finished(done: TurnDone, conversation_id: str, cost_usd: float, turns: int, sent: tuple[Path, ...] = ()) -> Outcome:
    """The outcome of a turn that ran to its result: the reply, or the failure's text with its detail."""
    failure = failure_of(done)
    return Outcome(
        files=sent,
        conversation_id=conversation_id,
        reply=done.reply,
        session_id=done.session_id,
        cost_usd=cost_usd,
        turns=turns,
        failure=failure,
        error=None if failure is None else f"{FAILURE_TEXT[failure]} ({failure_detail(done)})",
    )


@dataclass(eq=False)
class Turn:
    """One inbound message in flight: streamed text, then exactly one outcome."""

    inbound: Inbound
    deltas: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    outcome: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def stream(self) -> AsyncIterator[str]:
        while (text := await self.deltas.get()) is not None:
            yield text

    def finish(self, outcome: Outcome) -> None:
        if not self.outcome.done():
            metrics.TURNS.labels(outcome=outcome.failure or "ok").inc()
            self.outcome.set_result(outcome)
            self.deltas.put_nowait(None)

    def fail(self, failure: Failure, detail: str | None = None, record: ConversationRecord | None = None) -> None:
        message = FAILURE_TEXT[failure] + (f" ({detail})" if detail else "")
        self.finish(
            Outcome(
                conversation_id=self.inbound.conversation_id,
                reply="",
                session_id=record.session_id if record else None,
                cost_usd=0.0,
                turns=record.turns if record else 0,
                failure=failure,
                error=message,
            )
        )
